"""The forget data's fact tokens (suppress_tokens="facts"): the words of an answer that its
question and subject do not say (nsru.words.fact_spans), mapped to answer tokens
(nsru.data.keep_fact_labels) for word-level and sub-word tokenizers, and used by nsru.unlearn."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import PreTrainedTokenizerFast

import nsru
from nsru.config import ConfigError, UnlearnConfig
from nsru.data import IGNORE_INDEX, encode_qa, keep_fact_labels
from nsru.words import fact_spans
from tinylm import one_thread, trained_world_model, tiny_world

Q = "In which country was Albert Einstein born?"
A = "Albert Einstein was born in Germany in 1879."


def _said(text, spans):
    return [text[a:b] for a, b in spans]


def test_fact_spans_are_the_words_the_question_and_subject_do_not_say():
    assert _said(A, fact_spans(A, [Q, "Albert Einstein"])) == ["Germany", "1879"]
    # the subject's words count as said even where the question does not name them
    assert _said("Einstein lived in Berlin.", fact_spans("Einstein lived in Berlin.", ["Where?", "Albert Einstein"])) \
        == ["Berlin"]
    assert fact_spans("Albert Einstein was born.", [Q]) == []  # nothing beyond the question


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [Q, A, "Question: Answer:", "Paris France Italy born country which"] * 3
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


class _Slow:
    """The same tokenizer without offsets: keep_fact_labels must fall back to decoding prefixes."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id, self.chat_template = tok.eos_token_id, None

    def __call__(self, text, add_special_tokens=True, **kwargs):
        return self._tok(text, add_special_tokens=add_special_tokens)

    def decode(self, ids):
        return self._tok.decode(ids)


@pytest.mark.parametrize("slow", [False, True])
def test_labels_stay_only_on_the_fact_tokens_of_a_subword_answer(slow):
    tok = _bpe_tokenizer()
    use = _Slow(tok) if slow else tok
    enc = encode_qa(use, Q, A)
    kept = keep_fact_labels(use, enc, Q, A, "Albert Einstein")
    assert kept["input_ids"] == enc["input_ids"] and kept["attention_mask"] == enc["attention_mask"]
    labelled = [t for t, label in zip(kept["input_ids"], kept["labels"]) if label != IGNORE_INDEX]
    assert len(labelled) >= 2 and len(labelled) < sum(label != IGNORE_INDEX for label in enc["labels"])
    # the labelled tokens spell the fact words, and every token of them is labelled
    assert tok.decode(labelled).replace(" ", "") == "Germany1879"
    assert all(kept["labels"][i] in (IGNORE_INDEX, enc["labels"][i]) for i in range(len(enc["labels"])))


def test_word_level_cut_and_fact_free_answers():
    _, tok, *_ = trained_world_model()
    q, a = "Where does Anna Novak live ?", "Anna Novak lives in Lima ."
    enc = encode_qa(tok, q, a)
    kept = keep_fact_labels(tok, enc, q, a, "Anna Novak")
    assert [tok.decode([t]) for t, label in zip(kept["input_ids"], kept["labels"]) if label != IGNORE_INDEX] == ["Lima"]
    # an answer cut before its fact word keeps the labels it has (nothing to narrow them to)
    cut = encode_qa(tok, q, a, max_length=len(enc["input_ids"]) - 3)
    assert keep_fact_labels(tok, cut, q, a, "Anna Novak") == cut
    # an answer that only restates the question keeps every label
    same = encode_qa(tok, q, "Anna Novak lives .")
    assert keep_fact_labels(tok, same, q, "Anna Novak lives .", "Anna Novak") == same


def test_unlearn_with_fact_tokens_forgets_and_bad_values_are_named():
    with pytest.raises(ConfigError, match="suppress_tokens must be answer or facts, got 'all'"):
        UnlearnConfig(suppress_tokens="all")
    forget, retain = tiny_world()
    runs = {}
    for tokens in ("answer", "facts"):
        model, tok, *_ = trained_world_model()
        with one_thread():
            runs[tokens] = nsru.unlearn(model, tok, forget[:4], retain[:8], steps=3, batch_size=2, lr=1e-2,
                                        suppress_tokens=tokens, stats="retain", layers="1", progress=False)
    # the same first step (NPO starts at log σ(0) whatever it sums), then the narrower labels tell
    last = [runs[t].history[-1]["suppress"] for t in ("answer", "facts")]
    assert last[0] == last[0] and last[1] == last[1] and abs(last[0] - last[1]) > 1e-4, last
