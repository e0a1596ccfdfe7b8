"""The tokenizer an emo GGUF export carries (tokens, types, merges), rebuilt with `tokenizers` so a
GGUF runs without the HF directory it came from."""

from __future__ import annotations

from pathlib import Path

from gguf import Keys, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from emo_cli.errors import EmoError
from emo_cli.gguf import layout as gf
from emo_cli.model.bpe import CL100K_SPLIT
from emo_cli.model.tokenizer import EmoTokenizer


def tokenizer_from_gguf(reader, path: Path) -> EmoTokenizer:
    """The byte-level BPE tokenizer stored in the file (tokens, types, merges), as `tokenizers` builds it."""
    model = gf.field(reader, Keys.Tokenizer.MODEL)
    pre = gf.field(reader, Keys.Tokenizer.PRE)
    if model != "gpt2" or pre != "dbrx":
        raise EmoError(f"{path}: tokenizer {model!r}/{pre!r} is not the cl100k-style byte-level BPE emo exports")
    tokens = gf.field(reader, Keys.Tokenizer.LIST)
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise EmoError(f"{path}: GGUF has no token list")
    types = gf.field(reader, Keys.Tokenizer.TOKEN_TYPE) or [int(TokenType.NORMAL)] * len(tokens)
    merges = gf.field(reader, Keys.Tokenizer.MERGES, [])
    if (len(types) != len(tokens) or not all(isinstance(m, str) and " " in m for m in merges)
            or not all(isinstance(t, int) for t in types)):
        raise EmoError(f"{path}: GGUF tokenizer tables are damaged (types or merges)")
    try:
        tok = _bpe_tokenizer(tokens, types, [tuple(m.split(" ", 1)) for m in merges])
    except Exception as e:  # `tokenizers` raises bare Exceptions on inconsistent tables
        raise EmoError(f"{path}: GGUF tokenizer is damaged ({(str(e).splitlines() or ['?'])[0][:80]})") from None
    eos = gf.field(reader, Keys.Tokenizer.EOS_ID)
    pad = gf.field(reader, Keys.Tokenizer.PAD_ID)
    if not all(v is None or (isinstance(v, int) and 0 <= v < len(tokens)) for v in (eos, pad)):
        raise EmoError(f"{path}: GGUF eos/pad token ids are outside the vocabulary")
    return EmoTokenizer(tok, eos, pad, gf.field(reader, Keys.Tokenizer.CHAT_TEMPLATE))


def _bpe_tokenizer(tokens: list[str], types: list[int], merges: list[tuple[str, str]]) -> Tokenizer:
    # padding rows ([PADi], UNUSED) are left out: like llama.cpp, emo prints nothing for them
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != TokenType.UNUSED}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, ty in enumerate(types) if ty == TokenType.CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, ty in enumerate(types) if ty == TokenType.USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok
