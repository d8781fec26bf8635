#!/usr/bin/env bash
# Re-split the staged default GGUF into two parts sized to ride beside the FlashInfer bundle:
#   .device-ga/part_a (44 MB: carry with .device, 19.6 MB)  and  .device-gb/part_b + stash.sh (54 MB:
#   carry with .stage/train-data, 7.6 MB). Each device call stays under the 64 MiB carry limit with
#   the repository (~17 MB), where stage-model.sh's 60 + 35 MB parts leave no room for .device.
# usage (after `bash ../shared/device/stage-model.sh` wrote .device-part1/ and .device-part2/):
#   tools/split_stage.sh
# device calls, back to back on one machine:
#   1. carry [".device", ".device-ga"]:  mkdir -p /root/stash && cp .device-ga/part_a /root/stash/ && ...
#   2. carry [".device-gb", ...]:        bash .device-gb/stash.sh && ... /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
sha=$(grep -o '[0-9a-f]\{64\}' .device-part2/stash.sh | head -n 1)
whole=$(mktemp)
cat .device-part1/part* .device-part2/part* > "$whole"
echo "$sha  $whole" | sha256sum -c --quiet
mkdir -p .device-ga .device-gb
head -c 44000000 "$whole" > .device-ga/part_a
tail -c +44000001 "$whole" > .device-gb/part_b
rm "$whole"
cat > .device-gb/stash.sh <<STASH
# reassemble the default GGUF from /root/stash/part_a (copied by an earlier call) and part_b here
set -e; here=\$(cd "\$(dirname "\$0")" && pwd); mkdir -p /root/stash
cat /root/stash/part_a "\$here/part_b" > /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$sha  /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet && rm /root/stash/part_a && echo /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf
STASH
du -b .device-ga/part_a .device-gb/part_b
