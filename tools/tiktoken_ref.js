#!/usr/bin/env node
// tiktoken_ref.js: reference ids (and speed) from the tiktoken npm package, for
// nmoe's tokenizer tests and `nmoe bench tokenizer`.
//
//   node tools/tiktoken_ref.js ENC[,ENC...] [--hex] < texts.jsonl
//     Each input line is a JSON string or {"text": ...}. For every line and every
//     encoding prints one line: ids separated by spaces; with --hex:
//     "ENC<TAB>utf-8 bytes of the text in hex<TAB>ids".
//   node tools/tiktoken_ref.js ENC --bench FILE
//     FILE holds documents separated by NUL bytes; encodes them all once and
//     prints {"bench":"tokenizer","impl":"tiktoken-npm",...,"mb_per_s":...}.
//
// Ids are encode_ordinary's: special-token text is ordinary text. ENC is gpt2,
// cl100k_base, o200k_base or o200k_harmony (o200k_base ranks and regex plus the
// gpt-oss harmony special tokens, as tiktoken's Python package defines it).
"use strict";
const fs = require("fs");
const path = require("path");
const { Tiktoken } = require("tiktoken/lite");

function harmonySpecials(base) {
  const sp = Object.assign({}, base, {
    "<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
    "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007,
    "<|message|>": 200008, "<|call|>": 200012,
  });
  const named = new Set(Object.values(sp));
  for (let i = 200000; i < 201088; i++) if (!named.has(i)) sp[`<|reserved_${i}|>`] = i;
  return sp;
}

function openEncoding(name) {
  const file = name === "o200k_harmony" ? "o200k_base" : name;
  const ok = ["gpt2", "cl100k_base", "o200k_base"].includes(file);
  if (!ok) throw new Error(`unknown encoding ${name}`);
  const def = require(path.join("tiktoken", "encoders", `${file}.json`));
  const special = name === "o200k_harmony" ? harmonySpecials(def.special_tokens) : def.special_tokens;
  return new Tiktoken(def.bpe_ranks, special, def.pat_str);
}

function main() {
  const args = process.argv.slice(2);
  if (!args.length) {
    console.error("usage: tiktoken_ref.js ENC[,ENC...] [--hex] < texts.jsonl | ENC --bench FILE");
    process.exit(2);
  }
  const names = args[0].split(",");
  const encs = names.map(openEncoding);
  const bench = args.indexOf("--bench");
  if (bench >= 0) {
    const docs = fs.readFileSync(args[bench + 1], "utf8").split("\0");
    const bytes = docs.reduce((s, d) => s + Buffer.byteLength(d, "utf8"), 0);
    names.forEach((name, k) => {
      let tokens = 0;
      const t0 = process.hrtime.bigint();
      for (const d of docs) tokens += encs[k].encode_ordinary(d).length;
      const s = Number(process.hrtime.bigint() - t0) / 1e9;
      console.log(JSON.stringify({ bench: "tokenizer", impl: "tiktoken-npm", encoding: name, threads: 1,
        bytes, tokens, seconds: +s.toFixed(4), mb_per_s: +(bytes / s / 1e6).toFixed(3) }));
    });
    return;
  }
  const hex = args.includes("--hex");
  const out = [];
  for (const line of fs.readFileSync(0, "utf8").split("\n")) {
    if (!line.trim()) continue;
    const v = JSON.parse(line);
    const text = typeof v === "string" ? v : v.text;
    names.forEach((name, k) => {
      const ids = Array.from(encs[k].encode_ordinary(text)).join(" ");
      out.push(hex ? `${name}\t${Buffer.from(text, "utf8").toString("hex")}\t${ids}` : ids);
    });
  }
  process.stdout.write(out.join("\n") + (out.length ? "\n" : ""));
  encs.forEach((e) => e.free());
}

main();
