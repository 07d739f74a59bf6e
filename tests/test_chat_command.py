"""`qwen3vl chat` as a user drives it: through a pseudo-terminal (prompt, line editing, Ctrl-C, Ctrl-D)
and with piped stdin. Every answer is checked against `Pipeline.generate` (greedy) on the same
conversation, computed here with the same engine: the chat must send the whole conversation, with
its images, each turn, and keep exactly what it printed.
"""

from __future__ import annotations

import codecs
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from commands.chat import PROMPT, stream_answer, terminal_safe
from conftest import assert_one_line_error, qwen3vl, random_image
from runtime import Pipeline

NEW_TOKENS = 8
# The child makes the pseudo-terminal its controlling terminal (it leads a new session), so that
# Ctrl-C typed there reaches it as SIGINT, as in a terminal window.
ON_CONTROLLING_TERMINAL = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                           "os.execv(sys.executable, [sys.executable, '-m', 'commands', *sys.argv[1:]])")
ESCAPE_SEQUENCE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine("gqa2-tied")


@pytest.fixture(scope="module")
def pipe(engine):
    return Pipeline.load(engine, backend="ort")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "picture.png"
    random_image(64, 96, seed=3).save(path)
    return str(path)


def answer(pipe, messages, new_tokens=NEW_TOKENS) -> str:
    return pipe.generate(messages, max_new_tokens=new_tokens, do_sample=False).text


def user(text, *images) -> dict:
    images = [{"type": "image", "image": i} for i in images]
    return {"role": "user", "content": images + [{"type": "text", "text": text}]}


def assistant(text) -> dict:
    return {"role": "assistant", "content": text}


class Terminal:
    """`qwen3vl chat` on a pseudo-terminal: keys in, the screen's text out (escape sequences dropped,
    the terminal's CR LF read as LF)."""

    def __init__(self, engine, home, *options, new_tokens=NEW_TOKENS):
        master, slave = pty.openpty()
        env = dict(os.environ, TERM="dumb", HOME=str(home), PYTHONIOENCODING="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-c", ON_CONTROLLING_TERMINAL, "chat", "--engine", engine, "--backend", "ort",
             "--greedy", "--max-new-tokens", str(new_tokens), *options],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=env)
        os.close(slave)
        self.master, self.raw, self.seen = master, "", 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def screen(self) -> str:
        return ESCAPE_SEQUENCE.sub("", self.raw).replace("\r\n", "\n")

    def _read(self, until: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        self.raw += self.decoder.decode(data)
        return bool(data)

    def expect(self, text: str, timeout: float = 60) -> str:
        """Waits until `text` shows after what was already expected; returns the screen between."""
        until = time.monotonic() + timeout
        while text not in self.screen[self.seen:]:
            if time.monotonic() > until or not self._read(until):
                raise AssertionError(f"waited for {text!r}; the screen after the last match:\n"
                                     f"{self.screen[self.seen:][-3000:]!r}")
        start = self.screen.index(text, self.seen)
        between, self.seen = self.screen[self.seen:start], start + len(text)
        return between

    def expect_more(self, timeout: float = 60) -> None:
        """Waits until anything shows after what was already expected."""
        until = time.monotonic() + timeout
        while len(self.screen) <= self.seen:
            if time.monotonic() > until or not self._read(until):
                raise AssertionError("nothing more came")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def say(self, line: str, expected_answer: str) -> None:
        """Types a line and checks the answer printed below it, up to the next prompt."""
        self.type(line + "\r")
        self.expect(line + "\n")
        assert self.expect("\n" + PROMPT) == terminal_safe(expected_answer)

    def close(self) -> int:
        """Ctrl-D at the prompt; the exit status."""
        self.type("\x04")
        try:
            status = self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            os.close(self.master)
        return status


@pytest.fixture
def terminal(engine, tmp_path):
    opened = []

    def start(*options, **kwargs) -> Terminal:
        opened.append(Terminal(engine, tmp_path, *options, **kwargs))
        opened[-1].expect(PROMPT)
        return opened[-1]

    yield start
    for t in opened:
        if t.process.poll() is None:
            t.process.kill()
            t.process.wait()


def test_each_turn_streams_the_answer_generate_gives_for_the_whole_conversation(terminal, pipe, tmp_path):
    chat = terminal()
    first = answer(pipe, [user("Hello there.")])
    chat.say("Hello there.", first)
    second = answer(pipe, [user("Hello there."), assistant(first), user("And then?")])
    assert second != answer(pipe, [user("And then?")])  # the first turn matters, so the check can fail
    chat.say("And then?", second)
    assert chat.close() == 0
    history = (tmp_path / ".qwen3vl_chat_history").read_text()
    assert "Hello there." in history and "And then?" in history
    assert (tmp_path / ".qwen3vl_chat_history").stat().st_mode & 0o077 == 0


def test_slash_image_attaches_to_the_next_turn_and_slash_save_writes_the_conversation(terminal, pipe, image,
                                                                                      tmp_path):
    chat = terminal("--system", "Be brief.")
    system = {"role": "system", "content": "Be brief."}
    chat.type(f"/image {image}\r")
    assert "attached" in chat.expect(PROMPT)
    with_image = answer(pipe, [system, user("What is this?", image)])
    assert with_image != answer(pipe, [system, user("What is this?")])
    chat.say("What is this?", with_image)

    for bad, message in ((tmp_path / "missing.png", "image file not found"), (__file__, "not an image file")):
        chat.type(f"/image {bad}\r")
        shown = chat.expect(f"\n{PROMPT}")
        error_line = shown.split("\n", 1)[1]
        assert error_line.startswith("error: ") and message in error_line and "\n" not in error_line, shown
    chat.type("/frobnicate\r")
    assert chat.expect(f"\n{PROMPT}").split("\n", 1)[1] == "error: unknown command /frobnicate (/help lists them)"

    conversation = [system, user("What is this?", image), assistant(with_image)]
    follow_up = answer(pipe, conversation + [user("Why?")])  # no image: the bad ones were not attached
    chat.say("Why?", follow_up)
    saved = tmp_path / "chat.json"
    chat.type(f"/save {saved}\r")
    chat.expect(f"saved 5 messages to {saved}\n{PROMPT}")
    assert chat.close() == 0
    assert json.loads(saved.read_text()) == {"format": "qwen3vl-chat",
                                             "messages": conversation + [user("Why?"), assistant(follow_up)]}


def test_slash_reset_forgets_the_conversation(terminal, pipe):
    chat = terminal()
    fresh = answer(pipe, [user("Hello there.")])
    chat.say("Hello there.", fresh)
    assert answer(pipe, [user("Hello there."), assistant(fresh), user("Hello there.")]) != fresh
    chat.type("/reset\r")
    chat.expect(f"new conversation\n{PROMPT}")
    chat.say("Hello there.", fresh)
    assert chat.close() == 0


def test_ctrl_c_stops_the_answer_keeps_what_was_printed_and_the_chat_goes_on(terminal, pipe, tmp_path):
    long = 200  # tokens: a second or more, while Ctrl-C comes within milliseconds of the first text
    chat = terminal(new_tokens=long)
    chat.type("Tell me a story.\r")
    chat.expect("Tell me a story.\n")
    chat.expect_more()
    chat.type("\x03")
    chat.expect(f"[stopped]\n{PROMPT}")
    saved = tmp_path / "stopped.json"
    chat.type(f"/save {saved}\r")
    chat.expect(PROMPT)
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    partial, full = messages[1]["content"], answer(pipe, [user("Tell me a story.")], long)
    assert partial and full.startswith(partial) and len(partial) < len(full)

    chat.say("Go on.", answer(pipe, messages + [user("Go on.")], long))
    assert chat.close() == 0


def test_ctrl_c_at_the_prompt_clears_the_line(terminal, pipe):
    chat = terminal()
    chat.type("something half typed")
    chat.expect("half typed")
    chat.type("\x03")
    chat.expect(f"(Ctrl-D or /quit leaves)\n{PROMPT}")
    chat.say("Hello there.", answer(pipe, [user("Hello there.")]))
    assert chat.close() == 0


@pytest.mark.parametrize("presses", [1, 2])
def test_a_stopped_answer_releases_the_pipeline(pipe, presses):
    def ctrl_c(piece):
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs in this thread between bytecodes

    text, first_text, stopped = stream_answer(pipe.stream("Hello there.", max_new_tokens=50, do_sample=False), ctrl_c)
    assert stopped and text and first_text is not None
    assert answer(pipe, [user("Hello there.")], 50).startswith(text)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    other = []
    thread = threading.Thread(target=lambda: other.append(answer(pipe, [user("Hi.")], 2)))
    thread.start()
    thread.join(timeout=30)
    assert other, "another thread could not take the pipeline after the answer was stopped"


SMALL_CONTEXT = 512  # the engine tests/test_kv_window.py builds: a conversation outgrows it quickly


def piped_chat(engine, lines, *options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "commands", "chat", "--engine", engine, "--backend", "ort",
                           "--greedy", "--max-new-tokens", str(NEW_TOKENS), *options], input="\n".join(lines),
                          capture_output=True, text=True, timeout=120)


def test_piped_stdin_gives_the_answers_alone_and_refuses_a_conversation_beyond_the_context(tiny_engine, image,
                                                                                          tmp_path):
    engine = tiny_engine("gqa2-tied", max_context=SMALL_CONTEXT)
    pipe = Pipeline.load(engine, backend="ort")
    first = answer(pipe, [user("Hello there.", image)])
    too_long = "word " * SMALL_CONTEXT
    second = answer(pipe, [user("Hello there.", image), assistant(first), user("Thanks.")])
    saved = tmp_path / "chat.json"
    third = pipe.generate([user("Hello there.", image), assistant(first), user("Thanks."), assistant(second),
                           user("/slash")], max_new_tokens=NEW_TOKENS, do_sample=False)
    result = piped_chat(engine, [f"/image {image}", "Hello there.", too_long, "Thanks.", f"/save {saved}", "/reset",
                                 f"/load {saved}", "//slash", "/stats", ""])
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{first}\n{second}\n{third.text}\n"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "context" in errors[0] and "/reset" in errors[0], result.stderr
    # /stats: the last turn's prompt as generate() counted it; where the Pipeline reuses prefixes, the
    # tokens served from its cache, as generate() reported them for the same sequence of requests
    cached = getattr(third, "cached_tokens", None)
    expected = f"last answer: {third.prompt_tokens} prompt tokens" + (
        "" if cached is None else f", {cached} of them from the cache" if cached else "")
    assert "conversation: 3 turns" in result.stderr and expected + ";" in result.stderr, result.stderr


def test_kv_window_answers_a_conversation_beyond_the_context(tiny_engine):
    engine = tiny_engine("gqa2-tied", max_context=SMALL_CONTEXT)
    pipe = Pipeline.load(engine, backend="ort", kv_window=64)
    long_line = " ".join(["word"] * SMALL_CONTEXT)  # the chat strips the line's ends
    first = answer(pipe, [user("Hello there.")])
    second = answer(pipe, [user("Hello there."), assistant(first), user(long_line)])
    result = piped_chat(engine, ["Hello there.", long_line], "--kv-window", "64")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{first}\n{second}\n"


@pytest.mark.parametrize("flags, fragment", [
    (["--image", "nope.png"], "image file not found"),
    (["--temperature", "nan"], "temperature"),
])
def test_bad_flags_are_a_one_line_error_before_the_chat_starts(engine, tmp_path, flags, fragment):
    assert_one_line_error(qwen3vl("chat", "--engine", engine, "--backend", "ort", *flags, cwd=tmp_path), fragment)


def test_terminal_safe_shows_control_characters_and_keeps_the_rest():
    assert terminal_safe("a\tb\nc") == "a\tb\nc"
    assert terminal_safe("\x1b[2J\r\x7f\x9b é") == "^[[2J^M^?\\x9b é"


def test_a_saved_conversation_loads_back_and_anything_else_is_refused(tmp_path, image):
    from commands.conversation import Conversation
    from runtime.errors import PromptError

    saved = Conversation("Be brief.", [user("What is this?", image), assistant("A picture.")])
    path = tmp_path / "chat.json"
    saved.save(str(path))
    assert Conversation.load(str(path)) == saved
    for content, fragment in [("{not json", "not JSON"), ('{"messages": []}', "not a saved conversation"),
                              ('{"format": "qwen3vl-chat", "messages": [{"role": "robot", "content": "hi"}]}', "role"),
                              ('{"format": "qwen3vl-chat", "messages": [{"role": "user", "content": '
                               '[{"type": "image", "image": "relative.png"}]}]}', "absolute path")]:
        path.write_text(content)
        with pytest.raises(PromptError, match=fragment):
            Conversation.load(str(path))
