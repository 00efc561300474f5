"""An offline word-level tokenizer for the tiny models (vocab 128): no hub access needed."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ("python code math story chat number function list sum add x y 1 2 3 ? . , ! : the a an of to and in is it that for on with as was at by be this from or have not are but what all "
         "were when we there can your which their said if do will each about how up out them then she many some "
         "so these would other into has more her two like him see time could no make than first been its who "
         "now people my made over did down only way find use may water long little very after words called just "
         "where most know get through back much go good new write our me man too any day same right look think "
         "also around another came come work three word must because does part even place well").split()
VOCAB = SPECIAL + WORDS[: 128 - len(SPECIAL)]
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")


def make_tokenizer(out: Path | None = None) -> PreTrainedTokenizerFast:
    """A fast tokenizer over VOCAB (ids 0..127); BOS <s>=1, EOS </s>=2, PAD <pad>=0; saved to `out` if given."""
    assert len(VOCAB) == 128 and len(set(VOCAB)) == 128
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    if out is not None:
        fast.save_pretrained(out)
    return fast
