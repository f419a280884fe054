#!/usr/bin/env bash
# A checkpoint that cannot be trusted or does not match the run is refused with
# one clear line: a flipped byte, a missing rank file, a fingerprint mismatch,
# another world size. The checkpoint directory is left as it was.
source "$(dirname "$0")/lib/train_env.sh"
make_tokens "$T/data" 2 10000 5
write_config "$T/c.toml" "$T/data"
"$NMOE" train "$T/c.toml" --steps=10 --checkpoint_every=10 >"$T/a.log" 2>&1 || { cat "$T/a.log"; die "training failed"; }
IT="$T/ckpt/iter_0000010"
[ -f "$IT/manifest.json" ] || die "no finalised checkpoint"
expect_refusal() { # pattern, extra args...
  local pat=$1; shift
  if "$NMOE" train "$T/c.toml" --steps=12 --resume "$@" >"$T/r.log" 2>&1; then cat "$T/r.log"; die "resume should fail ($pat)"; fi
  [ "$(grep -c 'nmoe: error:' "$T/r.log")" -eq 1 ] || { cat "$T/r.log"; die "expected one error line ($pat)"; }
  grep -qi -- "$pat" "$T/r.log" || { cat "$T/r.log"; die "message does not mention '$pat'"; }
}
# Fingerprint: a model field changed.
expect_refusal "dim" --dim=48
# World size: pretend the checkpoint was written by 2 ranks.
cp "$IT/manifest.json" "$T/manifest.bak"
sed -i 's/"world": *1/"world": 2/' "$IT/manifest.json"
expect_refusal "2 ranks"
cp "$T/manifest.bak" "$IT/manifest.json"
# A flipped byte in the expert/optimizer file.
cp "$IT/rank_000.safetensors" "$T/rank.bak"
"$PY" - "$IT/rank_000.safetensors" <<'PYEOF'
import sys
p = sys.argv[1]; b = bytearray(open(p, 'rb').read()); b[len(b) // 2] ^= 0x40; open(p, 'wb').write(b)
PYEOF
expect_refusal "checksum"
cp "$T/rank.bak" "$IT/rank_000.safetensors"
# A missing rank file.
mv "$IT/rank_000.json" "$T/meta.bak"
expect_refusal "rank_000"
mv "$T/meta.bak" "$IT/rank_000.json"
# Restored: it resumes again.
"$NMOE" train "$T/c.toml" --steps=12 --resume >"$T/ok.log" 2>&1 || { cat "$T/ok.log"; die "resume of the restored checkpoint failed"; }
grep -q "resumed from" "$T/ok.log" || die "did not resume"
echo "ok: refusals are clear and the checkpoint survives them"
