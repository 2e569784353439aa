"""Per-document cleaning: normalisation steps, Gopher filters, language ID, stopwords, PII scrubbing."""

from __future__ import annotations

from collections import Counter

import pytest

from lmforge.data import Filters, Normalize, Tally, iter_clean, normalize_text, remove_stopwords, tokenize_words
from lmforge.data.filters import check, identify_language
from lmforge.data.pii import luhn_ok, scrub_pii
from lmforge.data.readers import Skip
from lmforge.errors import ConfigError

PROSE = ("The history of the city is long and it has been shaped by the river that runs through its centre. "
         "Merchants came to trade wool and grain, and the town grew around the market square where the old "
         "church still stands. Today the streets are quieter, but visitors can walk along the water and see "
         "the houses that were built by those families over many centuries of work and change in the region.")
OFF = Normalize(unicode=None, fix_mojibake=False, control_chars=False, whitespace=False)


def test_each_normalisation_step_can_be_switched_on_alone():
    assert normalize_text("ｆｕｌｌ ﬁ", Normalize(unicode="NFKC", fix_mojibake=False)) == "full fi"
    assert normalize_text("ｆｕｌｌ", Normalize(unicode="NFC", fix_mojibake=False)) == "ｆｕｌｌ"
    assert normalize_text("cafÃ© menu", Normalize(unicode=None, fix_mojibake=True, whitespace=False)) == "café menu"
    assert normalize_text("a\x00b\u200bc\x07", Normalize(unicode=None, fix_mojibake=False)) == "abc"
    assert normalize_text("\n  a \t b  \n\n\n\nc  d ", Normalize(unicode=None, fix_mojibake=False)) == "  a b\n\nc d"
    html = "<html><head><style>p{}</style></head><body><p>Hello &amp; bye</p><script>x()</script></body></html>"
    assert normalize_text(html, Normalize(strip_html=True)) == "Hello & bye"
    assert normalize_text("MiXeD", Normalize(lowercase=True)) == "mixed"
    assert normalize_text("  kept \x00as is ", OFF) == "  kept \x00as is "


def test_prose_passes_the_gopher_rules():
    assert check(PROSE, Filters()) is None


@pytest.mark.parametrize("text, rule", [
    ("too short to be a document", "min_words"),
    ("supercalifragilisticexpialidocious " * 60, "max_mean_word_length"),
    ("a b c d e f g h i j " * 10, "min_mean_word_length"),
    (PROSE + " #tag" * 20, "max_symbol_word_ratio"),
    ("\n".join(f"- item {i} of the list and the rest" for i in range(60)), "max_bullet_lines"),
    (PROSE + "\n" + "\n".join(f"and then the story went on for a while about the town {i}..." for i in range(30)),
     "max_ellipsis_lines"),
    (PROSE + " 1234 5678 90 12 34 56 78 90 11 22 33 44" * 4, "min_alpha_words"),
    (" ".join(["house garden window street market river"] * 10), "min_stopwords"),
    ("\n".join([PROSE[:80]] * 5 + [PROSE]), "max_duplicate_lines"),
])
def test_each_gopher_rule_removes_what_it_targets(text, rule):
    assert check(text, Filters()) == rule


def test_a_rule_set_to_none_is_off_and_filters_can_be_disabled():
    assert check("too short", Filters(min_words=None, min_stopwords=None)) is None
    assert check("x", Filters(enabled=False)) is None


def test_blocklist_word_lists_remove_matching_documents(tmp_path):
    words = tmp_path / "block.txt"
    words.write_text("# words\nmerchants\n赌博\n", encoding="utf-8")
    assert check(PROSE, Filters(blocklist=words)) == "blocklist"
    assert check(PROSE.replace("Merchants", "Traders"), Filters(blocklist=words)) is None


def test_language_id_knows_english_and_chinese():
    assert identify_language(PROSE)[0] == "en"
    lang, prob = identify_language("今天天气很好，我们一起去公园散步，然后在湖边的小餐馆吃午饭。")
    assert lang == "zh" and prob > 0.9


def test_language_id_and_jieba_load_their_models_without_network(monkeypatch):
    """Both models ship inside their wheels: loading them with every socket refused still works."""
    import socket

    import jieba

    from lmforge.data import filters

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    filters._identifier.cache_clear()
    assert filters.identify_language("这是一个中文句子，用来测试语言识别。")[0] == "zh"
    assert "公园" in jieba.Tokenizer().lcut("我们去公园散步")


def test_chinese_documents_are_filtered_with_chinese_words_and_stopwords():
    zh = ("北京是中国的首都，也是一座历史悠久的城市。很多游客每年都会来这里参观故宫和长城，"
          "他们在胡同里散步，品尝当地的小吃，了解这个城市的文化和生活。我们在这里学习了很多东西，"
          "也认识了很多新的朋友，大家都觉得这次旅行非常有意思。")
    tally = Tally()
    kept = list(iter_clean([{"id": "zh:1", "text": zh}], tally))
    assert [d["lang"] for d in kept] == ["zh"], tally.removed
    assert tally.languages == Counter({"zh": 1})


def test_word_tokenizers_and_stopword_removal_for_english_and_chinese():
    assert tokenize_words("Don't stop: it's 2024!", "en") == ["don't", "stop", "it's", "2024"]
    assert remove_stopwords("The cat sat on the mat and it was happy", lang="en") == "cat sat mat happy"
    assert remove_stopwords("我们今天去公园散步了", lang="zh") == "今天 公园 散步"
    with pytest.raises(ConfigError, match="no stopword list"):
        remove_stopwords("x", lang="tlh")


def test_stopword_step_rewrites_kept_documents():
    (doc,) = iter_clean([{"id": "1", "text": PROSE}], stopwords=True)
    assert doc["text"].startswith("history city long shaped river")


def test_iter_clean_counts_every_record():
    tally = Tally()
    records = [{"id": "a", "text": PROSE}, {"id": "b", "text": "short"}, Skip("c", "invalid-json", "x"),
               {"id": "d", "text": "\x00\x01"}]
    kept = list(iter_clean(records, tally))
    assert [d["id"] for d in kept] == ["a"]
    assert tally.removed == Counter({"min_words": 1, "empty_after_normalize": 1})
    assert tally.skipped == Counter({"invalid-json": 1}) and tally.balanced()


@pytest.mark.parametrize("text, kind", [
    ("write to jane.doe+news@mail.example.co.uk today", "email"),
    ("call (555) 123-4567 now", "phone"),
    ("call 555-123-4567 now", "phone"),
    ("ring +44 20 7946 0958 please", "phone"),
    ("host 203.0.113.7 responded", "ip_address"),
    ("host 2001:db8:85a3::8a2e:370:7334 responded", "ip_address"),
    ("card 4111 1111 1111 1111 expires", "credit_card"),
    ("card 5500-0000-0000-0004 expires", "credit_card"),
])
def test_pii_is_replaced_by_a_typed_placeholder_and_counted(text, kind):
    counts: Counter = Counter()
    out = scrub_pii(text, counts)
    assert counts == Counter({kind: 1})
    assert f"<{kind.upper()}>" in out and out.split()[0] == text.split()[0]


def test_card_numbers_that_fail_luhn_are_left_alone():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert scrub_pii("order 4111 1111 1111 1112 shipped") == "order 4111 1111 1111 1112 shipped"


def test_no_false_positives_in_ordinary_prose_and_code():
    prose = ("On 2021-03-04 at 12:30:45 the team released version 1.2.3.4.5 of the tool; it cost $1,234.56 and "
             "sold 10,000 copies in 3.5 weeks. Chapter 4.1 covers pages 100-120. Call me maybe, said the note.")
    code = ("def f(xs):\n    return xs[1::2] + xs[::3]\n\nstd::vector<int> v; a::b::c();\nx = 0xDEADBEEF\n"
            "ts = 1700000000123\nuuid = '123e4567-e89b-12d3-a456-426614174000'\nratio = 3.14159265358979\n"
            "port = 8080; version = '10.0.0'\nemail_re = r'[\\w.]+@[\\w.]+'\n")
    counts: Counter = Counter()
    assert scrub_pii(prose, counts) == prose
    assert scrub_pii(code, counts) == code
    assert not counts
