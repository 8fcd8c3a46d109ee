"""The model's tokenizer: its tokenizer.json, or a BERT WordPiece tokenizer built from vocab.txt that
lowercases and strips accents as the folder's tokenizer_config.json says (as transformers' BertTokenizer
does). glue_data.load_tokenizer is this module's load_tokenizer.

    tokenizer = load_tokenizer("path/to/model")     # ValueError or FileNotFoundError names what is wrong
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from support.files import read_json


def _vocabulary_casing(model_dir: Path, vocab: dict[str, int]) -> bool:
    """True (lowercase) for a vocabulary without capital letters; a cased one is refused: without a
    tokenizer_config.json that says do_lower_case, whether to lowercase its texts cannot be told."""
    cased = sum(1 for token in vocab if not token.startswith("[") and token != token.lower())
    if cased > 0.01 * len(vocab):
        raise ValueError(f"{model_dir / 'vocab.txt'} has capital letters ({cased} tokens), but nothing in "
                         "the folder says whether texts are lowercased: add a tokenizer_config.json with "
                         '{"do_lower_case": false} (or true)')
    return True


def _casing(model_dir: Path, vocab: dict[str, int]) -> dict:
    """BertNormalizer's settings from tokenizer_config.json. Without that file the vocabulary decides:
    an uncased one (no capital letters) is lowercased, as ELECTRA and BERT-uncased are; a cased one is
    refused, since lowercasing its texts would silently lose what the model was trained to see."""
    config_path = model_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return {"lowercase": _vocabulary_casing(model_dir, vocab)}
    config = read_json(config_path, "")
    if config.get("do_lower_case") is None:  # the file does not say: the vocabulary decides, as above
        config["do_lower_case"] = _vocabulary_casing(model_dir, vocab)
    settings = {"lowercase": config["do_lower_case"], "strip_accents": config.get("strip_accents"),
                "handle_chinese_chars": config.get("tokenize_chinese_chars", True)}
    for key, value in (("do_lower_case", settings["lowercase"]), ("strip_accents", settings["strip_accents"]),
                       ("tokenize_chinese_chars", settings["handle_chinese_chars"])):
        if not isinstance(value, bool) and not (key == "strip_accents" and value is None):
            raise ValueError(f"{config_path}: {key} must be true or false, got {value!r}")
    return settings


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The model's tokenizer: tokenizer.json if the folder has one, else a BERT WordPiece tokenizer built
    from vocab.txt that lowercases (and strips accents) as the folder's tokenizer_config.json says
    (do_lower_case, strip_accents, tokenize_chinese_chars, as in transformers' BertTokenizer)."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as error:  # the tokenizers library raises a bare Exception for a bad file
            raise ValueError(f"{model_dir / 'tokenizer.json'}: not a tokenizer file the tokenizers library "
                             f"can read ({error}); give the model's own tokenizer.json, or delete it to "
                             "use vocab.txt") from None
    elif (model_dir / "vocab.txt").is_file():
        lines = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
        lines = lines[:-1] if lines[-1] == "" else lines
        vocab: dict[str, int] = {}
        for index, token in enumerate(lines):  # a repeated token would shift every later id by one
            if token in vocab:
                raise ValueError(f"{model_dir / 'vocab.txt'}, line {index + 1}: the token {token!r} is also "
                                 f"on line {vocab[token] + 1}; a vocabulary lists each token once (its "
                                 "line number is its id): use the model's own vocab.txt")
            vocab[token] = index
        if "[CLS]" not in vocab or "[SEP]" not in vocab:
            raise ValueError(f"{model_dir / 'vocab.txt'}: no [CLS] or [SEP] token; not a BERT vocabulary")
        tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tokenizer.normalizer = normalizers.BertNormalizer(**_casing(model_dir, vocab))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A:0 [SEP]:0", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",  # type ids 0 | 1
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        tokenizer.decoder = decoders.WordPiece()
        # A literal "[SEP]" in a text is the special token, as in BERT's own tokenizer.
        tokenizer.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                  "[MASK]") if t in vocab])
    else:
        raise FileNotFoundError(f"{model_dir}: has neither tokenizer.json nor vocab.txt")
    # NOTE: hub tokenizer.json files may switch padding and truncation on (all-MiniLM-L6-v2 pads every
    # text to 128 tokens); encode() sets truncation itself and batches are padded by collate().
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
