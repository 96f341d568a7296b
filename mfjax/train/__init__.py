"""IB-Tune: information-bottleneck fine-tuning of the mean-field model (stage 1) and the policy (stage 2) with LoRA
(SPEC §3, IBTUNE.md).

losses (SFT, the score-function / RLOO estimator, the reference variant) · data (event split, the chunk walk) ·
batches (training prompts from the simulator's prompt code) · step (jitted steps, optimizer) · rollouts
(teacher-forced rollouts: held-out NLL, stage 2's mean fields) · checkpoint (orbax) · metrics (JSONL,
TensorBoard) · loop (``fit``: walk → step → log → evaluate → checkpoint → export). ``launch/train.py`` runs it.
"""
