"""WordPiece tokenizers: trained on the training texts for from-scratch models, or a checkpoint's own."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int = 1000) -> Tokenizer:
    """A BERT-style uncased WordPiece tokenizer ([CLS] text [SEP]) trained on `texts`."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


def load_checkpoint_tokenizer(directory: str | Path) -> Tokenizer:
    """The `tokenizer.json` saved beside a checkpoint (e.g. by a HF fast tokenizer's save_pretrained)."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: save the checkpoint's fast tokenizer beside it "
            "(e.g. ViltProcessor.from_pretrained(...).save_pretrained(dir))"
        )
    return Tokenizer.from_file(str(path))
