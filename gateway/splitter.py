"""Cut a long markdown answer into parts that each fit a platform's message size limit.

Platforms cap a message's length (counted here in characters, ``len()``), and agents answer in
markdown whose code fences must survive the cut: a part that ends inside a fence gets a closing
fence line added, and the next part starts with the fence reopened (same marker, same info string
when there is room for it), so that every part renders on its own.  Nothing of the answer is
dropped or changed: the parts' bodies, joined, are the text again; only fence lines are added
around them (:attr:`Part.prefix`, :attr:`Part.suffix`).

Where to cut, within the room a part has (the limit, minus the reopened fence it starts with,
minus a closing fence line if the cut falls inside a fence), in order of preference:

1. after a blank line (``"\\n\\n"``: a paragraph break),
2. after a line break,
3. after a sentence end (``". "``, ``"! "``, ``"? "``, or ``。！？`` which need no space),
4. after whitespace,
5. anywhere (a hard cut), the last resort.

Kinds 1-4 only count if they leave the part at least half full, so that a break near the start
of a part does not double the number of messages.  A cut that would fall inside a fence which
opened in this part moves to just before that fence's opening line instead, if that still leaves
the part a quarter full (a code block read in one piece is worth a shorter message), or if the
part would otherwise end with an empty code block.  A cut just before a fence's closing line
takes that line along when it fits, rather than leaving the next part an empty code block.  A cut
is never made between ``"\\r"`` and ``"\\n"``.

Fences follow CommonMark as far as chat answers need: a line of at most 3 spaces of indent, then
3 or more backticks or tildes, then an optional info string (which, for backticks, may not contain
a backtick: ```` ```x``` ```` is inline code, not a fence); closed by a line of at most 3 spaces,
then at least as many of the same character, then nothing but spaces or tabs.  A fence left open
at the end of the text is open to the end.  Fences inside block quotes or lists are not
recognised, and only ``"\\n"`` ends a line (a lone ``"\\r"`` is an ordinary character; the one
before a ``"\\n"`` is not part of the line's content).

Each part is parsed as what it is, a message of its own: a cut in the middle of a line makes
the rest of that line start the next part's first line.  Cut points where that would change how
the line reads (the rest of a line starting with ```` ``` ````, or a cut through a fence line) are
avoided whenever another point fits, so for ordinary markdown the parts read exactly as the
original; when nothing else fits, the splitter still keeps every part's fences balanced by
tracking the fences each part actually contains.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator

import attrs

__all__ = [
    "MIN_LIMIT",
    "Part",
    "cut",
    "split_text",
]

# The smallest limit that always leaves room for progress: a reopened "```\n", one character and
# "\n```" make 9, and a limit in the teens is already useless for a chat answer.
MIN_LIMIT = 16

_OPEN, _CLOSE = 1, 2

# The start of a line that may be a fence line (opening or closing); everything else cannot
# change the fence state, so lines are only looked at one by one where this matches.
_FENCE_LINE = re.compile(r"^ {0,3}(?:```|~~~)", re.MULTILINE)
_FENCE_LINE_HERE = re.compile(r" {0,3}(?:```|~~~)")
_LEAD = re.compile(r" {0,3}(`+|~+)")
_BLANKS = re.compile(r"[ \t]*")
_OPENER = re.compile(r"( {0,3})(`{3,}|~{3,})(.*)")

# Boundary patterns, searched backwards by _ends_desc (which needs matches of at most 2 chars).
_PARAGRAPH = re.compile(r"(?<=\n)\r?\n")
_SENTENCE = re.compile(r"[.!?] |[。！？]")
_SPACE = re.compile(r"[^\S\n]")


@attrs.frozen
class Part:
    """One message's worth of an answer: ``prefix + body + suffix`` is what is sent.

    ``body`` is a contiguous slice of the answer, so the bodies of all parts joined give the answer
    back.  ``prefix`` reopens a code fence the previous part had to close (e.g. ``"```python\\n"``)
    and ``suffix`` closes the fence this part ends in (e.g. ``"\\n```"``); both are usually empty.
    """

    prefix: str
    body: str
    suffix: str

    @property
    def text(self) -> str:
        """What is sent."""
        return self.prefix + self.body + self.suffix


def cut(text: str, limit: int, prefix: str = "") -> tuple[Part, str]:
    """The first part of ``prefix + text``, for a caller that cuts as text streams in.

    ``prefix`` is the reopened fence carried over from the previous cut (``""`` at first).  The
    caller must only cut what does not fit: ``len(prefix + text) > limit``, else ValueError.

    Returns ``(part, next_prefix)``: ``part.prefix == prefix``, ``part.body == text[:n]`` for some
    ``n >= 1``, ``len(part.text) <= limit``, and ``next_prefix`` is what the rest, ``text[n:]``,
    must be sent after (``""`` or a reopened fence line).
    """
    _check_limit(limit)
    fence = _parse_prefix(prefix, limit)
    if len(prefix) + len(text) <= limit:
        raise ValueError("the text fits in one part; there is nothing to cut")
    end, state = _Window(text, 0, limit, prefix, fence).cut()
    return Part(prefix, text[:end], _closing(text, end, state)), _reopen(state, limit)


def split_text(text: str, limit: int) -> list[Part]:
    """All the parts of ``text``, each at most ``limit`` characters.

    A text that fits is one part with empty prefix and suffix (``""`` gives ``[Part("", "", "")]``).
    The last part has no suffix: if the answer itself ends inside an open fence, so does its last
    part.
    """
    _check_limit(limit)
    parts: list[Part] = []
    start, prefix, fence = 0, "", None
    # Work on offsets into the one string: slicing off the rest at each cut would make a long
    # answer quadratic.
    while len(prefix) + len(text) - start > limit:
        end, state = _Window(text, start, limit, prefix, fence).cut()
        parts.append(Part(prefix, text[start:end], _closing(text, end, state)))
        # Parsed back, as `cut` does, so that both read the prefix the same way.
        prefix = _reopen(state, limit)
        fence = _parse_prefix(prefix, limit)
        start = end
    parts.append(Part(prefix, text[start:], ""))
    return parts


def _check_limit(limit: int) -> None:
    if limit < MIN_LIMIT:
        raise ValueError(f"a part limit below {MIN_LIMIT} characters leaves no room for fences")


@attrs.frozen
class _Fence:
    """An open code fence: what closes it (``char`` repeated ``length`` times or more) and what
    reopens it (``indent``, marker and ``info``)."""

    char: str
    length: int
    indent: str = ""
    info: str = ""

    @property
    def marker(self) -> str:
        return self.char * self.length


_Event = tuple[int, "_Fence | None"]
_NOTHING: _Event = (0, None)
_CLOSED: _Event = (_CLOSE, None)


def _parse_prefix(prefix: str, limit: int) -> _Fence | None:
    """The fence a carried-over prefix opens; it must be one fence opening line."""
    if not prefix:
        return None
    m = _OPENER.fullmatch(prefix[:-1].removesuffix("\r")) if prefix.endswith("\n") else None
    if m is None or (m[2][0] == "`" and "`" in m[3]):
        raise ValueError(f"prefix {prefix!r} is not a fence opening line")
    fence = _Fence(m[2][0], len(m[2]), m[1], m[3].strip(" \t\r"))
    # Room for one character of body and the closing line, else no cut could make progress.
    if len(prefix) + fence.length + 2 > limit:
        raise ValueError(f"prefix {prefix!r} leaves no room in a part of {limit} characters")
    return fence


def _reopen(fence: _Fence | None, limit: int) -> str:
    """The line that reopens ``fence`` at the start of the next part.

    The info string (and indent) is kept while the reopening and closing lines take at most half
    a part; beyond that every part would mostly repeat it, so only the marker is kept.  A marker
    so long that even it leaves no room (possible only with small limits) is shortened to three
    characters: the part then no longer reads exactly as the original, but it can be sent.
    """
    if fence is None:
        return ""
    closing = fence.length + 1
    # An info string starting with the fence character would lengthen the marker: "~~~" and
    # "~x" must reopen as "~~~ ~x", not "~~~~x".
    space = " " if fence.info.startswith(fence.char) else ""
    full = f"{fence.indent}{fence.marker}{space}{fence.info}\n"
    if len(full) + closing <= limit // 2:
        return full
    if fence.length + 1 + closing + 1 <= limit:
        return fence.marker + "\n"
    return fence.char * 3 + "\n"


def _closing(text: str, end: int, state: _Fence | None) -> str:
    """The suffix closing the fence a part ends in, on a line of its own."""
    if state is None:
        return ""
    return state.marker if text[end - 1] == "\n" else "\n" + state.marker


class _Line:
    """One line as the part being cut sees it, with what fence parsing needs, computed once.

    The part's first line starts at the cut point even if that is mid-line in the original.  The
    facts are kept so that asking about many cut points in one line (a hard cut may try them all)
    costs O(1) each instead of a re-read of the line: lines can be as long as the answer.
    """

    __slots__ = (
        "_blank_end",
        "_final_backtick_run",
        "_final_runs",
        "_first_backtick",
        "_full",
        "_info_end",
        "_last_nonblank",
        "_text",
        "char",
        "content_end",
        "end",
        "run_end",
        "run_start",
        "start",
    )

    def __init__(self, text: str, start: int, end: int) -> None:
        self._text = text
        self.start = start
        self.end = end  # the index of the "\n" ending the line, or len(text)
        self.content_end = end - 1 if end > start and text[end - 1] == "\r" else end
        m = _LEAD.match(text, start, self.content_end)
        if m is None:
            self.run_start = self.run_end = -1
            self.char = ""
        else:
            self.run_start, self.run_end = m.span(1)
            self.char = text[self.run_start]
        self._first_backtick: int | None = None
        self._blank_end: int | None = None
        self._last_nonblank: int | None = None
        self._final_backtick_run: int | None = None
        self._final_runs: dict[str, int] | None = None
        self._full: _Event | None = None
        self._info_end: int | None = None

    def full_event(self, state: _Fence | None) -> _Event:
        """What the whole line does to ``state`` (the fence open before it, always the same)."""
        if self._full is None:
            self._full = self.event(self.content_end, state)
        return self._full

    def event(self, end: int, state: _Fence | None) -> _Event:
        """What the line's content up to ``end`` does, read as a line of its own: open a fence
        (given), close ``state``, or nothing."""
        start, run_end = self.run_start, self.run_end
        run = min(run_end, end) - start
        if start < 0 or run < 3:
            return _NOTHING
        text = self._text
        if state is None:
            info = ""
            if end > run_end:
                if self.char == "`" and -1 < self.first_backtick() < end:
                    return _NOTHING
                info = text[run_end:end].strip(" \t\r")
            return (_OPEN, _Fence(self.char, run, text[self.start : start], info))
        if self.char != state.char or run < state.length:
            return _NOTHING
        if end > run_end and self.blank_end() < end:
            return _NOTHING
        return _CLOSED

    def tail_is_fence_line(self, pos: int, state: _Fence | None) -> bool:
        """Whether the rest of the line from ``pos``, starting a part of its own in ``state``,
        would read as a fence line (opening one, or closing ``state``)."""
        text, end = self._text, self.content_end
        k = pos
        while k < end and k - pos < 3 and text[k] == " ":
            k += 1
        if k + 3 > end:
            return False
        char = text[k]
        if char not in "`~" or text[k + 1] != char or text[k + 2] != char:
            return False
        in_lead = self.run_start <= k < self.run_end  # the rest starts in the line's own run
        if state is None:
            # An opening line, unless (for backticks) a backtick follows the marker run: the run
            # from k must be the line's last run of backticks.
            if char == "~":
                return True
            if in_lead:
                return self.first_backtick() < 0
            return k >= self.final_backtick_run()
        if char != state.char:
            return False
        if in_lead:
            return self.blank_end() == end and self.run_end - k >= state.length
        last = self.last_nonblank()
        return k >= self.final_run(char) and last + 1 - k >= state.length

    def good_head_end(self, end: int, state: _Fence | None) -> int:
        """The largest head end at most ``end`` whose head does to ``state`` what the whole line
        does (``self.start`` if there is none): cutting anywhere above it changes the line."""
        j = self.run_start
        if j < 0 or self.run_end - j < 3:
            return end  # heads and line alike are no fence lines
        if state is None:
            if self.char == "`" and self.first_backtick() >= 0:
                # No fence line; heads that stop before the backtick in the info string are.
                return end if end > self.first_backtick() else min(end, j + 2)
            # An opening line: only heads holding its whole marker and info string open the same.
            return end if end >= self.info_end() else self.start
        length = state.length
        if self.char != state.char or self.run_end - j < length:
            return end
        closing_heads_end = self.blank_end()  # heads ending in [j + length, this] close
        if closing_heads_end == self.content_end:
            return end if end >= j + length else self.start
        return end if end > closing_heads_end else min(end, j + length - 1)

    def info_end(self) -> int:
        """Where the info string of an opening line ends (at least the end of the marker)."""
        if self._info_end is None:
            content = self._text[self.start : self.content_end]
            self._info_end = max(self.run_end, self.start + len(content.rstrip(" \t\r")))
        return self._info_end

    def first_backtick(self) -> int:
        if self._first_backtick is None:
            self._first_backtick = self._text.find("`", self.run_end, self.content_end)
        return self._first_backtick

    def blank_end(self) -> int:
        """Where the spaces and tabs after the leading marker run end."""
        if self._blank_end is None:
            m = _BLANKS.match(self._text, self.run_end, self.content_end)
            self._blank_end = self.content_end if m is None else m.end()
        return self._blank_end

    def last_nonblank(self) -> int:
        if self._last_nonblank is None:
            content = self._text[self.start : self.content_end]
            self._last_nonblank = self.start + len(content.rstrip(" \t")) - 1
        return self._last_nonblank

    def final_run(self, char: str) -> int:
        """Where the run of ``char`` ending at the last non-blank character starts."""
        if self._final_runs is None:
            self._final_runs = {}
        start = self._final_runs.get(char)
        if start is None:
            head = self._text[self.start : self.last_nonblank() + 1]
            start = self._final_runs[char] = self.start + len(head.rstrip(char))
        return start

    def final_backtick_run(self) -> int:
        if self._final_backtick_run is None:
            last = self._text.rfind("`", self.start, self.content_end)
            if last < 0:
                self._final_backtick_run = self.content_end
            else:
                head = self._text[self.start : last + 1]
                self._final_backtick_run = self.start + len(head.rstrip("`"))
        return self._final_backtick_run


# A candidate cut: (end of the body, fence open there, start of the line that opened it in
# this part or None).
_Cut = tuple[int, "_Fence | None", "int | None"]


class _Window:
    """Choosing one cut: the text from ``start`` that a part of ``limit`` could hold."""

    def __init__(
        self, text: str, start: int, limit: int, prefix: str, fence: _Fence | None
    ) -> None:
        self.text = text
        self.start = start
        self.used = len(prefix)
        self.limit = limit
        self.fence = fence
        self.room = limit - len(prefix)
        # The body ends at most here; the caller made sure the text goes on beyond it.
        self.end = start + self.room
        self.half = start + max(1, self.room // 2)
        self._lines: dict[int, _Line] = {}
        self._current: _Line | None = None
        self._positions: list[int] = []
        self._states: list[tuple[_Fence | None, int | None]] = []
        self._scan_fences()

    def cut(self) -> tuple[int, _Fence | None]:
        chosen = (
            self._line_break()
            or self._within_lines(_SENTENCE)
            or self._within_lines(_SPACE)
            or self._hard()
        )
        end, state, opened = chosen
        if state is not None and opened is not None and opened > self.start:
            # Keep the code block whole: cut just before its opening line (outside any fence),
            # if that leaves the part a quarter full, or if the part would otherwise end with an
            # empty code block.
            newline = self.text.find("\n", opened)
            empty = newline < 0 or end <= newline + 1
            if empty or opened - self.start >= self.room // 4:
                return opened, None
        if state is not None and self.text[end - 1] == "\n":
            return self._take_closing_line(end, state)
        return end, state

    def _take_closing_line(self, end: int, state: _Fence) -> tuple[int, _Fence | None]:
        """A cut just before the fence's own closing line: take that line too if it fits.

        It is about as long as the closing line the part would get anyway, and the next part
        would otherwise start with an empty reopened code block.
        """
        text = self.text
        line_end = text.find("\n", end, self.end + 1)
        if line_end < 0:
            return end, state
        line = _Line(text, end, line_end)
        if line.full_event(state) != _CLOSED:
            return end, state
        for pos in (line_end + 1, line.content_end):
            if self._fits(pos, None) and not (text[pos - 1] == "\r" and text[pos] == "\n"):
                return pos, None
        return end, state

    def _scan_fences(self) -> None:
        """Record where the fence state changes, for every line ending inside the window."""
        text, start, end = self.text, self.start, self.end
        starts = [m.start() for m in _FENCE_LINE.finditer(text, start + 1, end)]
        if _FENCE_LINE_HERE.match(text, start, end):
            starts.insert(0, start)
        state, opened = self.fence, None
        for line_start in starts:
            line_end = text.find("\n", line_start, end)
            if line_end < 0:
                break  # this line and later ones end beyond the window
            line = self._lines[line_start] = _Line(text, line_start, line_end)
            kind, fence = line.full_event(state)
            if kind == _OPEN:
                state, opened = fence, line_start
            elif kind == _CLOSE:
                state, opened = None, None
            else:
                continue
            self._positions.append(line_end + 1)
            self._states.append((state, opened))

    def _state_at(self, pos: int) -> tuple[_Fence | None, int | None]:
        """The fence open at the start of the line starting at ``pos``."""
        i = bisect.bisect_right(self._positions, pos) - 1
        return self._states[i] if i >= 0 else (self.fence, None)

    def _line_of(self, pos: int) -> _Line:
        """The line ``pos`` is inside of (not at its start)."""
        line = self._current
        if line is not None and line.start < pos <= line.end:
            return line
        text = self.text
        newline = text.rfind("\n", self.start, pos)
        line_start = self.start if newline < 0 else newline + 1
        line = self._lines.get(line_start)
        if line is None:
            line_end = text.find("\n", pos)
            line = _Line(text, line_start, len(text) if line_end < 0 else line_end)
            self._lines[line_start] = line
        self._current = line
        return line

    def _fits(self, pos: int, state: _Fence | None) -> bool:
        closing = 0
        if state is not None:
            closing = state.length + (0 if self.text[pos - 1] == "\n" else 1)
        return self.used + pos - self.start + closing <= self.limit

    def _mid_line(self, pos: int) -> tuple[_Fence | None, int | None, bool]:
        """The fence open after a cut at ``pos`` inside a line, where it opened, and whether the
        cut leaves the line reading as it did (neither piece becomes a fence line of its own)."""
        line = self._line_of(pos)
        before, opened = self._state_at(line.start)
        head_end = pos - 1 if self.text[pos - 1] == "\r" else pos
        event = line.event(head_end, before)
        state = before
        if event[0] == _OPEN:
            state, opened = event[1], line.start
        elif event[0] == _CLOSE:
            state, opened = None, None
        faithful = event == line.full_event(before) and not line.tail_is_fence_line(pos, state)
        return state, opened, faithful

    def _line_break(self) -> _Cut | None:
        """The last fitting paragraph break in the second half of the room, else line break."""
        text = self.text
        for pos in _ends_desc(_PARAGRAPH, text, self.half, self.end):
            state, opened = self._state_at(pos)
            if self._fits(pos, state):
                return pos, state, opened
        newline = text.rfind("\n", self.half - 1, self.end)
        while newline >= 0:
            pos = newline + 1
            state, opened = self._state_at(pos)
            if self._fits(pos, state):
                return pos, state, opened
            newline = text.rfind("\n", self.half - 1, newline)
        return None

    def _within_lines(self, pattern: re.Pattern[str]) -> _Cut | None:
        text = self.text
        for pos in _ends_desc(pattern, text, self.half, self.end):
            if text[pos - 1] == "\r" and text[pos] == "\n":
                continue
            state, opened, faithful = self._mid_line(pos)
            if faithful and self._fits(pos, state):
                return pos, state, opened
        return None

    def _hard(self) -> _Cut:
        """The last point that fits, preferring one that leaves the lines reading as they did.

        Points are tried from the end down, skipping runs of points that cannot do: the heads
        of a long marker run that would open a fence too long to close in the room, and, once a
        point that fits is known, the points that would change how their line reads.  Without
        the skips a text of nothing but backticks would cost a few microseconds per character.
        """
        text = self.text
        fallback: _Cut | None = None
        pos = self.end
        while pos > self.start:
            if text[pos - 1] == "\r" and text[pos] == "\n":
                pos -= 1
                continue
            if text[pos - 1] == "\n":
                state, opened = self._state_at(pos)
                if self._fits(pos, state):
                    return pos, state, opened
                pos -= 1
                continue
            line = self._line_of(pos)
            before, _ = self._state_at(line.start)
            head_end = pos - 1 if text[pos - 1] == "\r" else pos
            if fallback is None:
                if before is None and line.run_start + 3 <= head_end <= line.run_end:
                    # The head opens a fence whose marker is as long as the head's run, and the
                    # closing line must fit too: used + body + 1 + marker <= limit.
                    most = (self.limit - self.used + self.start + line.run_start - 1) // 2
                    if pos > most:
                        pos = max(most, line.run_start + 2)
                        continue
            else:
                good = line.good_head_end(head_end, before)
                if good < head_end:
                    pos = max(good, line.start)
                    continue
                if before is not None and line.full_event(before) == _CLOSED:
                    # In a closing line, a cut after the marker's first `length` characters
                    # leaves a rest that opens a fence while three or more of the run remain.
                    lowest = line.run_start + before.length
                    if lowest <= head_end <= line.run_end - 3:
                        pos = lowest - 1
                        continue
            state, opened, faithful = self._mid_line(pos)
            if self._fits(pos, state):
                if faithful:
                    return pos, state, opened
                if fallback is None:
                    fallback = (pos, state, opened)
            pos -= 1
        # One character (or "\r\n") with the closing line always fits: _reopen and _parse_prefix
        # leave room for it.
        assert fallback is not None
        return fallback


def _ends_desc(pattern: re.Pattern[str], text: str, low: int, high: int) -> Iterator[int]:
    """Where matches of ``pattern`` (at most 2 characters long) end, between ``low`` and
    ``high`` inclusive, last first.

    Searches backwards in growing chunks, so that finding a boundary near the end of the room
    does not cost a scan of the whole room.
    """
    size = 128
    while high >= low:
        chunk = high - size
        # A match ending after `chunk` starts at chunk - 1 or later.
        ends = [m.end() for m in pattern.finditer(text, max(chunk - 1, 0), high)]
        for end in reversed(ends):
            if end <= chunk:
                break
            if end < low:
                return
            yield end
        high = chunk
        size *= 2
