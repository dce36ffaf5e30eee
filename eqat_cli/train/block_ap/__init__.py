"""Block-AP: block-wise training of a quantized block (EfficientQAT, phase 1).

For block i (in order):

* targets ``fp_out = FP_block_i(fp_in)``: the full-precision block on full-precision inputs;
* inputs ``q_in``: outputs of the already-quantized blocks before it;
* start from min-max (RTN) or GPTQ (:mod:`.start`), then train (:mod:`.train`) on
  ``MSE(q_block(q_in), fp_out)`` (or the ``token-rel`` loss, :func:`block_loss`) either the
  paper's way (weights, step sizes and zero points with AdamW, cosine schedule) or eqat's default
  (rounding offsets and clipping factors with signed gradient descent, keeping the best step);
* freeze to integers (:class:`PackedLinear`), then ``q_in = packed_block(q_in)``, ``fp_in = fp_out``.

The rooms: :mod:`.config` (recipes), :mod:`.blockio` (activations, weights block by block,
batched forwards, losses), :mod:`.start`, :mod:`.train`, :mod:`.driver` (the loop over blocks,
resume, checkpoint writing; its skeleton is :mod:`eqat_cli.train.runs`, shared with E2E-QP),
:mod:`.runner` (``eqat block-ap``'s library side, :func:`block_ap_from_spec`).

Memory: the model is a meta-device skeleton; each block's weights are read from the safetensors
shards only when it is its turn, and only that block is on the accelerator; once a block is done
its memory is handed back to the OS, so peak RSS does not grow with depth. Activations live in
RAM or in memory-mapped files (``offload_to_disk``).

Resume: every finished block is written atomically to the work directory; on restart the inputs of
the next block are recomputed by replaying the finished blocks (deterministic), so a resumed run
equals an uninterrupted one. No printing here: progress goes through a callback.
"""

from eqat_cli.train.block_ap.blockio import ActivationStore, block_loss, eval_block_loss
from eqat_cli.train.block_ap.config import (
    BESTS, INITS, LOSSES, OPTIMIZERS, PARAMS, RECIPES, SCHEDULES, BlockAPConfig, NonFiniteLossError, Progress,
)
from eqat_cli.train.block_ap.driver import STATE_FILE, WORK_SUFFIX, BlockAPResult, run_block_ap
from eqat_cli.train.block_ap.runner import block_ap_from_spec
from eqat_cli.train.block_ap.start import collect_hessians, gptq_init_block, quantize_block_start
from eqat_cli.train.block_ap.train import SignSGD, train_block

__all__ = [
    "ActivationStore", "block_loss", "eval_block_loss", "BESTS", "INITS", "LOSSES", "OPTIMIZERS",
    "PARAMS", "RECIPES", "SCHEDULES", "BlockAPConfig", "NonFiniteLossError", "Progress", "STATE_FILE",
    "WORK_SUFFIX", "BlockAPResult", "run_block_ap", "block_ap_from_spec", "collect_hessians", "gptq_init_block",
    "quantize_block_start", "SignSGD", "train_block",
]
