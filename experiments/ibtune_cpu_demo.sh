#!/usr/bin/env bash
# IB-Tune CPU demo: the machinery end to end on the real SmolLM2-135M-Instruct and English Twitter events, shrunk to
# fit a 2-core CPU (not the paper's set-up: see experiments/ibtune_*.flags for that). Stage 1 (the mean-field
# model), stage 2 (the policy on the stage-1 model's mean fields), each reporting the held-out NLL of real actions
# before and after, on events not trained on; then a simulation with both adapters.
#
#   bash experiments/ibtune_cpu_demo.sh            # from the repository root; RUN_DIR=... to move the outputs
set -euo pipefail
RUN_DIR=${RUN_DIR:-runs/ibtune_demo}
TWITTER_DIR=${TWITTER_DIR:-../shared/data/twitter/events}
mkdir -p "$RUN_DIR"
EVENTS="$RUN_DIR/twitter.jsonl"
[ -f "$EVENTS" ] || python launch/convert_twitter.py --twitter_dir="$TWITTER_DIR" --out="$EVENTS"

# 6 events (4 to train on, 2 held out by a seeded hash of the event id), the first 32 reactions of each: 2 chunks
# of 16 agents per event. One slot, LoRA r 16 on the seven projections, M = 48 mean-field tokens.
COMMON=(--events="$EVENTS" --num_events=6 --heldout_fraction=0.34 --num_agents=32 --batch_size=16 --slots=1
        --lora_rank=16 --lora_alpha=32 --lr=2e-4 --mf_max_new_tokens=48 --eval_worlds=2 --save_every=2
        --compilation_cache_dir="$RUN_DIR/jax_cache")
/usr/bin/time -v python launch/train.py --stage=mf "${COMMON[@]}" --k=2 --rel_agents=4 --train_temperature=1.0 \
    --out_dir="$RUN_DIR/mf" 2> >(tee "$RUN_DIR/mf.log" >&2)
/usr/bin/time -v python launch/train.py --stage=policy "${COMMON[@]}" --epochs=2 --nolog_ib_gain \
    --mean_field_lora="$RUN_DIR/mf/adapter" --out_dir="$RUN_DIR/policy" 2> >(tee "$RUN_DIR/policy.log" >&2)
# Close the loop: simulate two of the events with both adapters merged at load.
python launch/simulate.py --events="$EVENTS" --num_events=2 --num_agents=32 --warmup_steps=1 --mf_max_new_tokens=48 \
    --policy_lora="$RUN_DIR/policy/adapter" --mean_field_lora="$RUN_DIR/mf/adapter" --out_dir="$RUN_DIR/simulate"
