#!/usr/bin/env bash
# Re-split the staged default GGUF, xz-compressed (98.4 -> 90.5 MB), into two parts that each ride
# in one device call beside the repository (~2 MB without d2sd/checkpoints, ~17 MB with):
#   .device-ga/part_a (44 MB: carry with .device, 19.6 MB)  and
#   .device-gb/part_b + stash.sh (46.5 MB: carry with .stage, 9.9 MB).
# A call's working tree is capped at 64 MiB; the shipped drafters (14.6 MB) do not fit beside
# either part, so tools/gpu_calls.sh takes them out of the index for the first two calls.
# usage (after `bash ../shared/device/stage-model.sh` wrote .device-part1/ and .device-part2/):
#   tools/split_stage.sh
# device calls, back to back on one machine (tools/gpu_calls.sh does both):
#   1. carry [".device", ".device-ga"]:  mkdir -p /root/stash && cp .device-ga/part_a /root/stash/
#   2. carry [".device-gb", ...]:        bash .device-gb/stash.sh   (writes and checks the GGUF)
set -euo pipefail
cd "$(dirname "$0")/.."
sha=$(grep -o '[0-9a-f]\{64\}' .device-part2/stash.sh | head -n 1)
whole=$(mktemp)
cat .device-part1/part* .device-part2/part* > "$whole"
echo "$sha  $whole" | sha256sum -c --quiet
xz -T0 -6 -c "$whole" > "$whole.xz"
mkdir -p .device-ga .device-gb
head -c 44000000 "$whole.xz" > .device-ga/part_a
tail -c +44000001 "$whole.xz" > .device-gb/part_b
rm "$whole" "$whole.xz"
cat > .device-gb/stash.sh <<STASH
# reassemble the default GGUF from /root/stash/part_a (copied by an earlier call) and part_b here
set -e; here=\$(cd "\$(dirname "\$0")" && pwd); mkdir -p /root/stash
cat /root/stash/part_a "\$here/part_b" | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 22)" > /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$sha  /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet && rm /root/stash/part_a && echo /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf
STASH
du -b .device-ga/part_a .device-gb/part_b
