/* tok_bench.c: `nmoe bench tokenizer`: encoding speed, one thread and all
 * cores (OpenMP over documents), beside tiktoken (npm, through Node) on the same
 * documents when Node and tools/tiktoken_ref.js are there.
 *
 *   nmoe bench tokenizer [--encoding NAME|all] [--file PATH] [--mb N]
 *                        [--threads N] [--reps N] [--no-ref]
 *
 * Text: PATH, or a generated mixed corpus of N MB (prose, code, numbers,
 * whitespace runs, multilingual text, emoji). Documents are ~32 KiB chunks
 * ending at a newline. One JSON line per measurement:
 * {"bench":"tokenizer","impl":"nmoe"|"tiktoken-npm","encoding":...,"threads":N,
 *  "bytes":...,"tokens":...,"seconds":...,"mb_per_s":...}; best of --reps runs. */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/log.h"
#include "data/tokenizer.h"

#define DOC_BYTES (32 * 1024)

typedef struct {
  const char *p;
  size_t n;
} Doc;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng_next(uint64_t *s) {
  *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
  return *s;
}

/* A deterministic mixed corpus of about mb megabytes. */
static char *corpus_generate(size_t mb, size_t *len) {
  static const char *const WORDS[] = {
      "the", "of", "and", "to", "in", "is", "was", "that", "for", "it", "with", "as", "his", "on", "be",
      "at", "by", "I", "this", "had", "not", "are", "but", "from", "or", "have", "an", "they", "which",
      "one", "you", "were", "her", "all", "she", "there", "would", "their", "we", "him", "been", "has",
      "when", "who", "will", "more", "no", "if", "out", "so", "said", "what", "up", "its", "about",
      "into", "than", "them", "can", "only", "other", "new", "some", "could", "time", "these", "two",
      "may", "then", "do", "first", "any", "my", "now", "such", "like", "our", "over", "man", "me",
      "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back",
      "years", "where", "much", "your", "way", "well", "down", "should", "because", "each", "just",
      "tokenization", "international", "distributed", "experts", "throughput", "gradient", "Hopper",
      "don't", "it's", "they're", "we'll", "O'Brien", "mixture-of-experts", "state-of-the-art"};
  static const char *const OTHER[] = {
      "def forward(self, x):\n    h = self.norm(x)\n    return x + self.attn(h)\n\n",
      "for (int i = 0; i < n; i++) {\n\tacc += w[i] * x[i];\n}\n",
      "Total: 1,234,567.89 USD (2024-03-15), ratio 0.000314, id 9876543210.\n",
      "   \n\n\n    indented line with trailing spaces   \n",
      "Mixture-of-experts 모델은 전문가 여러 개를 씁니다. 专家混合模型在训练时更高效。\n",
      "Путь к данным: /data/flows/dev — «пример». Ελληνικά: γεια σου κόσμε.\n",
      "مرحبا بالعالم، هذا نص تجريبي. שלום עולם! नमस्ते दुनिया।\n",
      "Emoji: 🚀🔥 👩‍💻 👍🏽 🇯🇵 — café naïve résumé Ångström.\n",
      "{\"id\": 42, \"text\": \"hello\\nworld\", \"tags\": [\"a\", \"b\"]}\r\n",
  };
  size_t target = mb << 20, n = 0, cap = target + 4096, nw = sizeof WORDS / sizeof *WORDS;
  char *buf = xmalloc(cap);
  uint64_t s = 0x9E3779B97F4A7C15ull;
  while (n < target) {
    uint64_t r = rng_next(&s);
    const char *piece;
    char word[64];
    if (r % 50 == 0) piece = OTHER[(r >> 8) % (sizeof OTHER / sizeof *OTHER)];
    else {
      const char *w = WORDS[(r >> 8) % nw];
      const char *sep = (r >> 20) % 15 == 0 ? ". " : (r >> 20) % 11 == 0 ? ", " : (r >> 20) % 97 == 0 ? ".\n\n" : " ";
      int cap1 = (r >> 32) % 9 == 0;
      snprintf(word, sizeof word, "%s%s", w, sep);
      if (cap1 && word[0] >= 'a' && word[0] <= 'z') word[0] = (char)(word[0] - 32);
      piece = word;
    }
    size_t k = strlen(piece);
    if (n + k > cap) break;
    memcpy(buf + n, piece, k);
    n += k;
  }
  *len = n;
  return buf;
}

static char *file_read(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) nmoe_fatal("bench tokenizer: cannot open %s", path);
  size_t cap = 1 << 20, n = 0, k;
  char *buf = xmalloc(cap);
  while ((k = fread(buf + n, 1, cap - n, f)) > 0)
    if ((n += k) == cap) buf = xrealloc(buf, cap *= 2);
  if (ferror(f)) nmoe_fatal("bench tokenizer: cannot read %s", path);
  fclose(f);
  *len = n;
  return buf;
}

static Doc *docs_split(const char *text, size_t len, size_t *n_docs) {
  size_t cap = len / DOC_BYTES + 2, n = 0, pos = 0;
  Doc *d = xmalloc(cap * sizeof *d);
  while (pos < len) {
    size_t end = pos + DOC_BYTES < len ? pos + DOC_BYTES : len;
    const char *nl = end < len ? memchr(text + end, '\n', len - end) : NULL;
    end = nl ? (size_t)(nl - text) + 1 : len;
    if (n == cap) d = xrealloc(d, (cap *= 2) * sizeof *d);
    d[n++] = (Doc){text + pos, end - pos};
    pos = end;
  }
  *n_docs = n;
  return d;
}

/* Best of reps passes over all documents with `threads` threads; total tokens. */
static double time_encode(const Tokenizer *t, const Doc *docs, size_t n_docs, int threads, int reps,
                          size_t *tokens) {
  double best = 1e30;
  for (int r = 0; r < reps; r++) {
    size_t total = 0;
    double t0 = now_s();
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      uint32_t *ids = NULL;
      size_t cap = 0;
#pragma omp for schedule(dynamic, 4)
      for (size_t i = 0; i < n_docs; i++) total += tok_encode(t, docs[i].p, docs[i].n, &ids, &cap);
      free(ids);
    }
    double dt = now_s() - t0;
    if (dt < best) best = dt;
    *tokens = total;
  }
  return best;
}

/* tiktoken's speed on the same documents, through tools/tiktoken_ref.js. */
static void bench_reference(const char *enc, const Doc *docs, size_t n_docs) {
  char script[4200] = "tools/tiktoken_ref.js", exe[4000];
  ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (k > 0) {
    exe[k] = 0;
    char *slash = strrchr(exe, '/');
    if (slash) {
      *slash = 0;
      snprintf(script, sizeof script, "%s/../tools/tiktoken_ref.js", exe);
      if (access(script, R_OK)) snprintf(script, sizeof script, "tools/tiktoken_ref.js");
    }
  }
  if (access(script, R_OK) || system("node --version >/dev/null 2>&1")) {
    log_warn("bench tokenizer: node or %s missing; no tiktoken reference", script);
    return;
  }
  char tmp[] = "/tmp/nmoe_tokbench_XXXXXX";
  int fd = mkstemp(tmp);
  FILE *f = fd >= 0 ? fdopen(fd, "wb") : NULL;
  if (!f) nmoe_fatal("bench tokenizer: cannot create a temporary file");
  for (size_t i = 0; i < n_docs; i++) {
    if (i) fputc(0, f);
    fwrite(docs[i].p, 1, docs[i].n, f);
  }
  if (fclose(f)) nmoe_fatal("bench tokenizer: cannot write %s", tmp);
  char cmd[8600];
  snprintf(cmd, sizeof cmd, "node '%s' %s --bench '%s'", script, enc, tmp);
  fflush(stdout);
  if (system(cmd)) log_warn("bench tokenizer: `%s` failed", cmd);
  unlink(tmp);
}

int tok_bench_main(int argc, char **argv) {
  const char *enc_arg = "o200k_harmony", *file = NULL;
  size_t mb = 8;
  int threads = omp_get_max_threads(), reps = 3, ref = 1;
  for (int i = 0; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (i == 0 && !strcmp(a, "tokenizer")) continue;
    if (!strcmp(a, "--no-ref")) ref = 0;
    else if (v && !strcmp(a, "--encoding")) enc_arg = v, i++;
    else if (v && !strcmp(a, "--file")) file = v, i++;
    else if (v && !strcmp(a, "--mb")) mb = strtoul(v, NULL, 10), i++;
    else if (v && !strcmp(a, "--threads")) threads = atoi(v), i++;
    else if (v && !strcmp(a, "--reps")) reps = atoi(v), i++;
    else if (a[0] != '-' && !file) file = a;
    else {
      fprintf(stderr, "usage: nmoe bench tokenizer [--encoding NAME|all] [--file PATH] [--mb N] "
                      "[--threads N] [--reps N] [--no-ref]\n");
      return 2;
    }
  }
  if (threads < 1 || reps < 1 || (!file && mb < 1)) nmoe_fatal("bench tokenizer: --threads, --reps and --mb must be >= 1");
  size_t len;
  char *text = file ? file_read(file, &len) : corpus_generate(mb, &len);
  size_t n_docs;
  Doc *docs = docs_split(text, len, &n_docs);
  static const char *const ALL[] = {"gpt2", "cl100k_base", "o200k_base", "o200k_harmony"};
  int all = !strcmp(enc_arg, "all");
  for (int e = 0; e < (all ? 4 : 1); e++) {
    const char *name = all ? ALL[e] : enc_arg;
    char err[1024];
    double t0 = now_s();
    Tokenizer *t = tok_open(name, err, sizeof err);
    if (!t) nmoe_fatal("%s", err);
    double load_s = now_s() - t0;
    int counts[2] = {1, threads};
    size_t tokens_1 = 0;
    for (int k = 0; k < (threads > 1 ? 2 : 1); k++) {
      size_t tokens;
      double s = time_encode(t, docs, n_docs, counts[k], reps, &tokens);
      if (k == 0) tokens_1 = tokens;
      else if (tokens != tokens_1) nmoe_fatal("bench tokenizer: %d threads gave %zu tokens, 1 thread %zu", counts[k], tokens, tokens_1);
      printf("{\"bench\":\"tokenizer\",\"impl\":\"nmoe\",\"encoding\":\"%s\",\"threads\":%d,\"bytes\":%zu,"
             "\"tokens\":%zu,\"seconds\":%.4f,\"mb_per_s\":%.3f,\"load_seconds\":%.4f}\n",
             name, counts[k], len, tokens, s, (double)len / s / 1e6, load_s);
    }
    tok_close(t);
    if (ref) bench_reference(name, docs, n_docs);
  }
  free(docs);
  free(text);
  return 0;
}
