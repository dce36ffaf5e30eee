"""Named data sets: calibration corpora, perplexity sets and zero-shot tasks.

Each resolves to the Hugging Face Hub for users, or to a local copy under the data dir
(``--data-dir`` / ``EQAT_DATA_DIR``) when one is set; ``local_files`` are relative to it.
"""

from eqat_cli.hookspecs import hookimpl
from eqat_cli.specs import DatasetSpec

DATASETS = (
    DatasetSpec(
        name="wikitext2",
        kind="text",
        hub_path="Salesforce/wikitext",
        hub_name="wikitext-2-raw-v1",
        hub_splits={"train": "train", "validation": "validation", "test": "test"},
        local_files={
            "train": "wikitext-2-raw/wiki.train.raw",
            "validation": "wikitext-2-raw/wiki.valid.raw",
            "test": "wikitext-2-raw/wiki.test.raw",
        },
        description="WikiText-2 raw; perplexity on the test split (rows joined with blank lines)",
    ),
    DatasetSpec(
        name="c4",
        kind="text",
        hub_path="allenai/c4",
        hub_name="en",
        hub_splits={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        local_files={
            "train": "c4/c4_validation_2k.parquet",
            "validation": "c4/c4_validation_2k.parquet",
        },
        description="C4 English; locally a 2,000-document validation slice (not GPTQ's C4 set)",
    ),
    DatasetSpec(
        name="redpajama",
        kind="text",
        hub_path="togethercomputer/RedPajama-Data-1T-Sample",
        hub_splits={"train": "train"},
        description="RedPajama 1T sample, the EfficientQAT paper's calibration corpus",
    ),
    DatasetSpec(
        name="piqa",
        kind="task",
        hub_path="ybisk/piqa",
        hub_splits={"validation": "validation"},
        local_files={"validation": "piqa/piqa_validation.jsonl"},
        description="PIQA physical commonsense (lm-eval `piqa`)",
    ),
    DatasetSpec(
        name="arc_easy",
        kind="task",
        hub_path="allenai/ai2_arc",
        hub_name="ARC-Easy",
        hub_splits={"test": "test", "validation": "validation"},
        local_files={"test": "arc_easy/ARC-Easy-Test.jsonl", "validation": "arc_easy/ARC-Easy-Dev.jsonl"},
        description="ARC-Easy (lm-eval `arc_easy`)",
    ),
    DatasetSpec(
        name="hellaswag",
        kind="task",
        hub_path="Rowan/hellaswag",
        hub_splits={"validation": "validation"},
        local_files={"validation": "hellaswag/hellaswag_val_full.txt.bz2"},
        description="HellaSwag; locally llama.cpp's pre-processed text form (close to, not equal to, lm-eval)",
    ),
)


@hookimpl
def register_datasets(register):
    for spec in DATASETS:
        register(spec)
