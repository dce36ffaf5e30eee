"""LLaVA: only the language model is quantized; vision tower and projector stay full precision."""

from eqat_cli.hookspecs import hookimpl
from eqat_cli.plugins.llama import LLAMA_LINEARS, LLAMA_RESIDUAL_READERS, LLAMA_SCALE_PAIRS
from eqat_cli.specs import ArchitectureSpec

LLAVA = ArchitectureSpec(
    name="llava",
    model_types=("llava",),
    layers_path="model.language_model.layers",
    embed_path="model.language_model.embed_tokens",
    norm_path="model.language_model.norm",
    rotary_path="model.language_model.rotary_emb",
    lm_head_path="lm_head",
    linear_groups=LLAMA_LINEARS,
    scale_pairs=LLAMA_SCALE_PAIRS,
    full_precision_paths=("model.vision_tower", "model.multi_modal_projector"),
    residual_readers=LLAMA_RESIDUAL_READERS,
    # image features replace token embeddings: the projector's last linear writes the stream
    embedding_writers=("model.multi_modal_projector.linear_2",),
    text_config_attr="text_config",
    checkpoint_renames=(
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^vision_tower\.", "model.vision_tower."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    ),
    description="LLaVA with a Llama/Mistral language model (vision tower kept in full precision)",
)


@hookimpl
def register_architectures(register):
    register(LLAVA)
