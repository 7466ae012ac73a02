"""The multi-exit classes of this checkpoint, for transformers' ``trust_remote_code`` loading.

Every multi-exit model's ``save_pretrained`` copies this file beside config.json as ``modeling_multiexit.py``, and
config.json's ``auto_map`` names it, so that

    AutoModelForSequenceClassification.from_pretrained(folder_or_hub_id, trust_remote_code=True)

returns the multi-exit model without importing anything first. The classes themselves come from the installed
``multiexit-encoders`` package (import name ``multiexit``), which this file only imports: the checkpoint runs the
package's code, never a copy of it. Where the package is imported already, the Auto classes find the classes it
registered and do not read this file at all.
"""

try:  # transformers checks a remote-code file's imports itself, but not those inside a try block
    from multiexit.albert import MultiExitAlbertConfig, MultiExitAlbertForSequenceClassification
    from multiexit.bert import (
        MultiExitBertConfig,
        MultiExitBertForSequenceClassification,
        MultiExitRobertaConfig,
        MultiExitRobertaForSequenceClassification,
    )
except ModuleNotFoundError as error:
    if error.name != "multiexit":
        raise
    raise ImportError(
        "this checkpoint's model classes (multi-exit BERT, RoBERTa, ALBERT) come from the multiexit-encoders "
        "package, which is not installed: install it (pip install <its repository folder or wheel>) and load again"
    ) from error

__all__ = [
    "MultiExitAlbertConfig",
    "MultiExitAlbertForSequenceClassification",
    "MultiExitBertConfig",
    "MultiExitBertForSequenceClassification",
    "MultiExitRobertaConfig",
    "MultiExitRobertaForSequenceClassification",
]
