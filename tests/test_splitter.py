"""Tests for gateway.splitter: where long answers are cut, and what the parts keep whole.

The property tests read each part with a fence parser of their own (``fence_state``), written
from the rules rather than shared with the splitter, so a wrong idea in one is not hidden by the
same idea in the other.
"""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.splitter import MIN_LIMIT, Part, cut, split_text

# --- a reference fence parser -------------------------------------------------------------------

# (char, marker length, info string) of the fence open at the end, or None.
Fence = tuple[str, int, str]

_OPEN_RE = re.compile(r"( {0,3})(`{3,}|~{3,})(.*)")
_CLOSE_RE = re.compile(r" {0,3}(`{3,}|~{3,})[ \t]*")


def fence_state(text: str, state: Fence | None = None) -> Fence | None:
    """The fence open after reading ``text`` line by line (a partial last line is a line)."""
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if state is None:
            m = _OPEN_RE.fullmatch(line)
            if m and not (m[2][0] == "`" and "`" in m[3]):
                state = (m[2][0], len(m[2]), m[3].strip(" \t\r"))
        else:
            m = _CLOSE_RE.fullmatch(line)
            if m and m[1][0] == state[0] and len(m[1]) >= state[1]:
                state = None
    return state


def reopens(prefix: str, fence: Fence, limit: int) -> bool:
    """Whether ``prefix`` is one line reopening ``fence``: same marker; the info string may be
    dropped; a marker too long to leave room in a part is shortened to three characters."""
    if not prefix.endswith("\n") or prefix.count("\n") != 1:
        return False
    got = fence_state(prefix[:-1])
    if got is None or got[0] != fence[0] or got[2] not in (fence[2], ""):
        return False
    return got[1] == fence[1] or (got[1] == 3 and 2 * fence[1] + 3 > limit)


def texts(parts: list[Part]) -> list[str]:
    return [p.text for p in parts]


# --- boundary kinds -----------------------------------------------------------------------------


def test_text_that_fits_is_one_part() -> None:
    assert split_text("short answer", 16) == [Part("", "short answer", "")]
    assert split_text("x" * 16, 16) == [Part("", "x" * 16, "")]
    assert split_text("", 16) == [Part("", "", "")]


def test_paragraph_break_beats_a_later_line_break() -> None:
    # A line break fits at 20, but the paragraph break at 11 is at least half full.
    assert texts(split_text("Para one.\n\nline two\nline three", 20)) == [
        "Para one.\n\n",
        "line two\nline three",
    ]


def test_line_break() -> None:
    assert texts(split_text("First line of it\nsecond line here", 20)) == [
        "First line of it\n",
        "second line here",
    ]


def test_sentence_end_beats_a_later_space() -> None:
    assert texts(split_text("Alpha beta. Gamma delta epsilon", 20)) == [
        "Alpha beta. ",
        "Gamma delta epsilon",
    ]
    assert texts(split_text("Is it? Yes! It is, mostly", 20)) == ["Is it? Yes! ", "It is, mostly"]


def test_cjk_sentence_ends_need_no_space() -> None:
    text = "这是第一句。这是第二句！这是第三句？还有更多的文字在这里呢"
    assert texts(split_text(text, 16)) == [
        "这是第一句。这是第二句！",
        # The ？ at 6 would leave the part less than half full: hard cut.
        "这是第三句？还有更多的文字在这里",
        "呢",
    ]


def test_whitespace() -> None:
    assert texts(split_text("alpha beta gamma delta", 16)) == ["alpha beta ", "gamma delta"]


def test_hard_cut_is_the_last_resort() -> None:
    assert texts(split_text("abcdefghijklmnopqrstuvwxyz", 16)) == [
        "abcdefghijklmnop",
        "qrstuvwxyz",
    ]


def test_a_boundary_must_leave_the_part_half_full() -> None:
    # The paragraph break at 5 is too early; the space at 15 is the best boundary that counts.
    assert texts(split_text("Hi.\n\nThis is a longer line of text", 20)) == [
        "Hi.\n\nThis is a ",
        "longer line of text",
    ]


def test_never_between_cr_and_lf() -> None:
    assert texts(split_text("abcdefghijklmno\r\nxyz", 16)) == ["abcdefghijklmno", "\r\nxyz"]
    assert texts(split_text("aaaaaaaaaaaaaa\r\nbbbb", 16)) == ["aaaaaaaaaaaaaa\r\n", "bbbb"]
    text = "x\r\n\r\n" + "y" * 10 + "\r\nzz"
    assert texts(split_text(text, 16)) == ["x\r\n\r\n" + "y" * 10, "\r\nzz"]
    # A CRLF blank line is a paragraph break too.
    assert texts(split_text("aaaaaaa\r\n\r\nbbb\r\nccccccc", 16)) == [
        "aaaaaaa\r\n\r\n",
        "bbb\r\nccccccc",
    ]


# --- fences -------------------------------------------------------------------------------------


def test_fence_is_closed_and_reopened_with_its_info_string() -> None:
    text = "```python\nprint(1)\nprint(2)\nprint(3)\nprint(4)\n```\nDone."
    parts = split_text(text, 40)
    assert texts(parts) == [
        "```python\nprint(1)\nprint(2)\nprint(3)\n```",
        "```python\nprint(4)\n```\nDone.",
    ]
    assert parts[0] == Part("", "```python\nprint(1)\nprint(2)\nprint(3)\n", "```")
    assert parts[1] == Part("```python\n", "print(4)\n```\nDone.", "")


def test_cut_inside_a_code_line_closes_on_a_line_of_its_own() -> None:
    text = "```\nthe first code line is long\n```"
    assert split_text(text, 24) == [
        Part("", "```\nthe first code ", "\n```"),
        Part("```\n", "line is long\n```", ""),
    ]


def test_tilde_fence_keeps_its_marker_and_backticks_inside_do_not_close_it() -> None:
    text = "~~~~ text\n```\n~~~\nstill code here\n~~~~\nafter"
    assert texts(split_text(text, 30)) == [
        "~~~~ text\n```\n~~~\n~~~~",
        "~~~~text\nstill code here\n~~~~\n",
        "after",
    ]
    # With less room, reopening with the info string would take more than half a part.
    assert texts(split_text(text, 24)) == [
        "~~~~ text\n```\n~~~\n~~~~",
        "~~~~\nstill code \n~~~~",
        "~~~~\nhere\n~~~~\nafter",
    ]


def test_cut_moves_before_a_fence_that_starts_in_the_part() -> None:
    # "...code.\n```sh\nmake\n```" would fit, but the block would be cut for no good reason.
    text = "Some text before the code.\n```sh\nmake\nmake test\n```\n"
    assert texts(split_text(text, 44)) == [
        "Some text before the code.\n",
        "```sh\nmake\nmake test\n```\n",
    ]


def test_cut_stays_in_a_fence_that_starts_early_in_the_part() -> None:
    # The fence starts before a quarter of the part: cutting before it would waste the part.
    text = "Run:\n```sh\nmake build\nmake test\nmake install\n```\n"
    assert texts(split_text(text, 40)) == [
        "Run:\n```sh\nmake build\nmake test\n```",
        "```sh\nmake install\n```\n",
    ]


def test_no_part_ends_with_an_empty_code_block() -> None:
    # The opening line alone would fit (and is early in the part), but the block would be empty.
    text = "Look:\n```python title=example.py\nprint(1)\nprint(2)\nprint(3)\n```\n"
    assert texts(split_text(text, 40)) == [
        "Look:\n",
        "```python title=example.py\nprint(1)\n```",
        # Reopening with that info string would take more than half the part: marker only.
        "```\nprint(2)\nprint(3)\n```\n",
    ]


def test_the_closing_line_goes_with_its_block() -> None:
    # Cutting before the closing line would start the next part with an empty reopened block.
    text = "```python\nprint(1)\nprint(2)\nprint(3)\n```\nThe end."
    assert texts(split_text(text, 40)) == [
        "```python\nprint(1)\nprint(2)\nprint(3)\n```",
        "\nThe end.",
    ]


def test_no_cut_makes_the_rest_of_a_line_open_a_fence() -> None:
    # Cutting at the last space (after "and ") would start the next part with "~~~ then".
    assert texts(split_text("Words go here and ~~~ then more", 20)) == [
        "Words go here ",
        "and ~~~ then more",
    ]


def test_no_cut_makes_the_rest_of_a_code_line_close_its_fence() -> None:
    # Cutting after "1 " would start the next part with a line "```", closing the block.
    assert texts(split_text("```\nlet x = 1 ```\nmore\n```", 20)) == [
        "```\nlet x = \n```",
        "```\n1 ```\nmore\n```",
    ]


def test_info_string_starting_with_the_fence_character_is_reopened_apart() -> None:
    text = "~~~ ~tilde\nline one\nline two\nline three\n~~~\n"
    parts = split_text(text, 36)
    assert texts(parts) == [
        "~~~ ~tilde\nline one\nline two\n~~~",
        "~~~ ~tilde\nline three\n~~~\n",
    ]


def test_inline_triple_backticks_are_not_a_fence() -> None:
    text = "```x``` is inline code and not a fence at all"
    parts = split_text(text, 24)
    assert all(p.prefix == "" and p.suffix == "" for p in parts)
    assert "".join(p.body for p in parts) == text


def test_unclosed_fence_at_the_end_stays_open_in_the_last_part() -> None:
    parts = split_text("```\nline one\nline two\nline three", 24)
    assert texts(parts) == ["```\nline one\n```", "```\nline two\nline three"]


def test_indented_fence_is_reopened_with_its_indent() -> None:
    text = "  ```js\n  a();\n  b();\n  c();\n  d();\n  ```\n"
    parts = split_text(text, 40)
    assert parts[1].prefix == "  ```js\n"
    assert fence_state(parts[0].text) is None


def test_info_string_too_long_for_the_part_reopens_with_the_marker_only() -> None:
    text = "```" + "x" * 40 + "\ncode\n```"
    parts = split_text(text, 20)
    assert "".join(p.body for p in parts) == text
    assert all(len(p.text) <= 20 for p in parts)
    assert all(p.prefix in ("", "```\n") for p in parts)
    assert all(fence_state(p.text) is None for p in parts)


def test_fence_marker_too_long_for_the_part_still_makes_progress() -> None:
    text = "`" * 100 + "\ncode\n" + "`" * 100
    parts = split_text(text, 16)
    assert "".join(p.body for p in parts) == text
    assert all(len(p.text) <= 16 and p.body for p in parts)
    assert all(fence_state(p.text) is None for p in parts[:-1])


def test_long_info_string_with_a_larger_limit_is_kept() -> None:
    info = "python title=example.py"
    text = f"```{info}\n" + "".join(f"print({i})\n" for i in range(20)) + "```\n"
    parts = split_text(text, 100)
    assert len(parts) > 1
    assert all(p.prefix == f"```{info}\n" for p in parts[1:])


# --- the streaming API ---------------------------------------------------------------------------


def test_cut_returns_the_first_part_and_the_prefix_for_the_rest() -> None:
    text = "```python\nprint(1)\nprint(2)\nprint(3)\nprint(4)\n```\nDone."
    part, next_prefix = cut(text, 40)
    assert part == Part("", "```python\nprint(1)\nprint(2)\nprint(3)\n", "```")
    assert next_prefix == "```python\n"
    rest = text[len(part.body) :]
    part2, next_prefix2 = cut(rest + " and more words to go beyond", 40, next_prefix)
    assert part2.prefix == "```python\n"
    assert part2.body == "print(4)\n```\nDone. "
    assert next_prefix2 == ""


def test_cut_rejects_what_it_cannot_cut() -> None:
    with pytest.raises(ValueError):
        cut("fits", 16)
    with pytest.raises(ValueError):
        cut("x" * 100, MIN_LIMIT - 1)
    with pytest.raises(ValueError):
        cut("x" * 100, 16, "not a fence\n")
    with pytest.raises(ValueError):
        cut("x" * 100, 16, "```")  # no line end
    with pytest.raises(ValueError):
        cut("x" * 100, 16, "``````````\n")  # no room left for a closing line
    with pytest.raises(ValueError):
        split_text("x", 15)


def test_a_long_answer_with_code_splits_whole() -> None:
    # Speed is checked by hand, not here: about 15 ms for 1 MB of such text at limit 3500.
    block = "A paragraph with some words. " * 20 + "\n\n```python\n" + "x = 1\n" * 40 + "```\n\n"
    text = block * 20
    parts = split_text(text, 3500)
    assert "".join(p.body for p in parts) == text


# --- properties ---------------------------------------------------------------------------------

_TOKENS = [
    "`",
    "``",
    "```",
    "````",
    "```py",
    "``` a`b",
    "~",
    "~~~",
    "~~~~ info",
    "\n",
    "\n\n",
    "\r\n",
    "\r",
    " ",
    "   ",
    "    ",
    "\t",
    "a",
    "word",
    "Word.",
    ". ",
    "! ",
    "? ",
    "。",
    "！",
    "？",
    "中文字",
    "x" * 37,
    "supercalifragilistic",
]

adversarial_text = st.one_of(
    st.lists(st.sampled_from(_TOKENS), max_size=60).map("".join),
    st.text(alphabet="`~\n\r \t.!?。！？a中", max_size=200),
)


def check_invariants(text: str, limit: int, parts: list[Part]) -> None:
    assert "".join(p.body for p in parts) == text
    assert all(len(p.text) <= limit for p in parts)
    assert parts[0].prefix == ""
    assert parts[-1].suffix == ""
    if len(text) <= limit:
        assert parts == [Part("", text, "")]
    for part, following in itertools.pairwise(parts):
        assert part.body
        assert not (part.body.endswith("\r") and following.body.startswith("\n"))
        # Every fence opened in the part is closed in it...
        assert fence_state(part.text) is None
        # ...by the suffix, if the body ends inside one, which the next part reopens.
        open_at_end = fence_state(part.prefix + part.body)
        if open_at_end is None:
            assert part.suffix == "" and following.prefix == ""
        else:
            marker = open_at_end[0] * open_at_end[1]
            assert part.suffix == (marker if part.body.endswith("\n") else "\n" + marker)
            assert reopens(following.prefix, open_at_end, limit)


@settings(max_examples=300, deadline=None)
@given(text=adversarial_text, limit=st.integers(MIN_LIMIT, 80))
def test_invariants_hold_for_any_text(text: str, limit: int) -> None:
    check_invariants(text, limit, split_text(text, limit))


@settings(max_examples=300, deadline=None)
@given(text=adversarial_text, limit=st.integers(MIN_LIMIT, 80))
def test_cutting_as_text_streams_gives_the_same_parts(text: str, limit: int) -> None:
    parts, prefix, rest = [], "", text
    while len(prefix) + len(rest) > limit:
        part, next_prefix = cut(rest, limit, prefix)
        assert part.prefix == prefix
        assert 1 <= len(part.body) and rest.startswith(part.body)
        assert len(part.text) <= limit
        parts.append(part)
        prefix, rest = next_prefix, rest[len(part.body) :]
    parts.append(Part(prefix, rest, ""))
    assert parts == split_text(text, limit)


_WORDS = [
    "a",
    "the",
    "answer",
    "is",
    "`code`",
    "``x``",
    "~~gone~~",
    "end.",
    "Why?",
    "Yes!",
    "中文。",
    "好！",
    "对吗？",
    "长长的句子没有空格",
    "supercalifragilisticexpialidocious",
    "1.5",
]


# Words that would read as a fence line if a cut made them start a line.
_FENCE_LIKE_WORDS = ["```", "~~~", "````py", "~~~~", "```inline```", "a```b"]


@st.composite
def markdown(draw: st.DrawFn) -> str:
    """Ordinary answers: paragraphs and fenced code, with opening lines short enough for the
    smallest limit used below.  Lines other than fence lines start with a plain word, but may
    go on with words that would read as a fence line if a cut made them start a line."""

    def line() -> str:
        first = draw(st.sampled_from(_WORDS[:4]))
        words = draw(st.lists(st.sampled_from(_WORDS + _FENCE_LIKE_WORDS), max_size=12))
        return " ".join([first, *words])

    blocks = []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            lines = [line() for _ in range(draw(st.integers(1, 4)))]
            blocks.append("\n".join(lines) + draw(st.sampled_from(["\n", "\n\n", "\n\n\n"])))
        else:
            char = draw(st.sampled_from("`~"))
            length = draw(st.integers(3, 5))
            indent = " " * draw(st.integers(0, 3))
            info = draw(st.sampled_from(["", "py", " sh", "json  ", "a b c"]))
            body = "".join(line() + "\n" for _ in range(draw(st.integers(0, 6))))
            closing = char * draw(st.integers(length, length + 1)) + " " * draw(st.integers(0, 2))
            blocks.append(f"{indent}{char * length}{info}\n{body}{closing}\n")
    text = "".join(blocks)
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    return text.rstrip("\n") if draw(st.booleans()) else text


@settings(max_examples=300, deadline=None)
@given(text=markdown(), limit=st.integers(24, 120))
def test_parts_of_ordinary_markdown_read_as_the_original(text: str, limit: int) -> None:
    """Each part starts in the fence the original is in at that point, and reads like the
    original from there: no cut made a piece of a line look like a fence line."""
    parts = split_text(text, limit)
    check_invariants(text, limit, parts)
    done = 0
    for part in parts:
        expected = fence_state(text[:done])
        if expected is None:
            assert part.prefix == ""
        else:
            assert reopens(part.prefix, expected, limit)
        done += len(part.body)
        at_end = fence_state(part.prefix + part.body)
        original = fence_state(text[:done])
        assert (at_end is None) == (original is None)
        if at_end is not None and original is not None:
            assert at_end[:2] == original[:2]


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(st.sampled_from([*_WORDS, "\n", "\n\n", "\r\n", "  "]), max_size=80).map(
        " ".join
    ),
    limit=st.integers(MIN_LIMIT, 100),
)
def test_parts_without_fences_are_at_least_half_full(text: str, limit: int) -> None:
    parts = split_text(text, limit)
    check_invariants(text, limit, parts)
    assert all(len(p.body) >= limit // 2 for p in parts[:-1])
