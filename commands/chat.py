"""`qwen3vl chat`: a conversation with an engine in the terminal.

Each line typed is a user turn; the whole conversation (earlier turns with their images, and the
answers) goes to `Pipeline.stream` every turn, and the answer is printed as it is generated.
Lines starting with `/` are commands (HELP). Choices a user may need to know:

- Ctrl-C during an answer stops it at the next piece of text (a second Ctrl-C stops at once, even
  in the middle of reading a long prompt); the part already printed stays in the conversation as the
  answer, as it stays on the screen. Stopped before any text: the turn is dropped.
- Ctrl-C at the prompt clears the line; Ctrl-D (end of input) or /quit leaves, with status 0.
- A turn that fails (a conversation longer than the engine's context without --kv-window, an image
  gone since it was attached, memory) prints one `error:` line and leaves the conversation as it was before the turn;
  the images attached for it are dropped with it.
- With stdin and stdout on a terminal: a prompt, line editing and history (stdlib readline, when
  the platform has it; history in ~/.qwen3vl_chat_history unless --no-history). Otherwise (piped)
  there is no prompt and answers are printed one after another, each ending with a newline; notes
  and errors always go to stderr. Control characters in answers are shown as ^X when stdout is a
  terminal (an answer must not move the cursor or send escape sequences), written as they are
  otherwise.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time

from . import backend_choice, generation_options
from .conversation import Conversation

PROMPT = "> "
HISTORY = "~/.qwen3vl_chat_history"
HELP = """commands:
  /image PATH...  attach images to your next message (checked now)
  /reset          start a new conversation (the system prompt stays)
  /save FILE      write the conversation as JSON (messages with image paths)
  /load FILE      continue a conversation written by /save
  /stats          the conversation's size and the last answer's timing
  /help           this list
  /quit           leave (so does Ctrl-D)
Ctrl-C stops an answer (the part printed stays in the conversation) or clears the line.
Start a message with // to send text that begins with /."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="talk with an engine in the terminal (images, history, streaming)")
    parser.add_argument("--engine", required=True, help="engine folder from `qwen3vl build`")
    backend_choice.add_arguments(parser)
    parser.add_argument("--image", action="append", default=[], help="image for the first message; repeat for several")
    parser.add_argument("--system", help="system prompt")
    generation_options.add_arguments(parser)
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    parser.add_argument("--kv-window", type=int, metavar="W",
                        help="keep answering once the conversation outgrows the engine's context, with a bounded KV "
                             "cache: the system prompt and images plus the most recent W tokens (default: refuse, "
                             "and /reset starts over)")
    parser.add_argument("--verify", action="store_true",
                        help="check every engine file against the manifest's SHA-256 hashes before loading")
    parser.add_argument("--history", default=HISTORY, help=f"line history file (default {HISTORY})")
    parser.add_argument("--no-history", action="store_true", help="keep no line history on disk")
    parser.set_defaults(handler=chat)


def chat(args) -> int:
    from runtime.errors import PromptError

    for stream in (sys.stdin, sys.stdout):  # an answer or a typed line the terminal's encoding lacks
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    options = generation_options.options(args)
    if args.max_new_tokens < 1:
        raise PromptError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    pipe = backend_choice.open_pipeline(args, engine=args.engine)
    # bad sampling values are the command's one-line error, not every turn's
    pipe.sampling(*(options[k] for k in ("do_sample", "temperature", "top_p", "top_k", "seed")))
    if args.kv_window is not None:
        pipe.use_kv_window(args.kv_window)
    session = ChatSession(pipe, options, Conversation(args.system), sys.stdin.isatty() and sys.stdout.isatty())
    for path in args.image:
        session.attach(path)  # a bad --image is the command's one-line error
    backend_choice.announce(args, pipe)
    history = None if args.no_history or not session.interactive else os.path.expanduser(args.history)
    readline = _line_editing(history) if session.interactive else None
    if session.interactive:
        session.note(f"qwen3vl chat: {args.engine} on {pipe.backend.name}; /help lists the commands, Ctrl-D leaves")
    try:
        session.run()
    finally:
        if readline is not None and history:
            _save_history(readline, history)
    return 0


class ChatSession:
    """The read-answer loop over one Pipeline and one Conversation."""

    def __init__(self, pipe, options: dict, conversation: Conversation, interactive: bool):
        self.pipe, self.options, self.conversation, self.interactive = pipe, options, conversation, interactive
        self.on_terminal = sys.stdout.isatty()
        self.last_turn: dict = {}
        self.commands = {"/image": self.command_image, "/reset": self.command_reset, "/save": self.command_save,
                         "/load": self.command_load, "/stats": self.command_stats, "/help": self.command_help}

    # -- output ----------------------------------------------------------------------------------

    def write(self, text: str) -> None:
        sys.stdout.write(terminal_safe(text) if self.on_terminal else text)
        sys.stdout.flush()

    def note(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def error(self, message) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        from runtime.errors import Qwen3VLError

        while True:
            try:
                line = input(PROMPT if self.interactive else "")
            except EOFError:
                if self.interactive:
                    self.write("\n")
                return
            except KeyboardInterrupt:  # at the prompt: the line is dropped
                self.write("\n")
                self.note("(Ctrl-D or /quit leaves)")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                name, _, argument = line.partition(" ")
                if name == "/quit":
                    return
                command = self.commands.get(name)
                if command is None:
                    self.error(f"unknown command {name} (/help lists them)")
                    continue
                try:
                    command(argument.strip())
                except Qwen3VLError as exc:
                    self.error(exc)
                except OSError as exc:  # /save, /load on the user's files
                    self.error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else exc)
                except KeyboardInterrupt:  # decoding a large image, say
                    self.note("[interrupted]")
                continue
            try:
                self.turn(line[1:] if line.startswith("//") else line)
            except Qwen3VLError as exc:
                self.error(exc)
                self.conversation.attached = []
            except MemoryError:
                self.error("out of memory (try a smaller --max-pixels, fewer images, or /reset)")
                self.conversation.attached = []
            except KeyboardInterrupt:  # before the answer began streaming: the turn is not taken
                self.note("[interrupted]")

    def turn(self, text: str) -> None:
        """One user turn and its streamed answer, added to the conversation once answered (or stopped
        after some text)."""
        from runtime.errors import PromptError

        user = self.conversation.user_message(text)
        messages = self.conversation.messages + [user]
        tokens, context = self.prompt_tokens(messages), self.pipe.manifest.max_context
        if tokens >= context and getattr(self.pipe, "kv_window", None) is None:
            raise PromptError(f"the conversation would be {tokens} tokens, more than this engine's context of "
                              f"{context}: /reset starts a new one (or chat with --kv-window W, or rebuild with a "
                              f"larger --max-context)")
        cached_before = _cached_tokens(self.pipe)
        start = time.perf_counter()
        pieces = self.pipe.stream(messages, **self.options)
        answer, first_text, stopped = stream_answer(pieces, self.write)
        self.write("\n")
        self.last_turn = {"prompt_tokens": tokens, "seconds": time.perf_counter() - start, "stopped": stopped,
                          "first_text": None if first_text is None else first_text - start,
                          "cached_tokens": None if cached_before is None else _cached_tokens(self.pipe) - cached_before}
        if stopped:
            self.note("[stopped]" if answer else "[stopped before any text: the message is dropped]")
        if answer or not stopped:
            self.conversation.add_turn(user, answer)

    def prompt_tokens(self, messages: list[dict]) -> int:
        """The prompt length of `messages`, from the text and the images' headers (nothing decoded)."""
        measured = []

        class Measured(Exception):
            pass

        def measure(lengths, grids) -> None:
            measured.append(int(lengths[0]))
            raise Measured

        try:
            self.pipe.prepare([messages], None, self.options["min_pixels"], self.options["max_pixels"], check=measure)
        except Measured:
            pass
        return measured[0]

    def attach(self, path: str) -> int:
        """Adds an image for the next user turn once it reads as an image within the engine's limits;
        returns its image tokens."""
        from runtime.image_processing import image_grid, load_image

        path = os.path.abspath(os.path.expanduser(path))
        settings = self.pipe.manifest.image_processor.with_budget(self.options["min_pixels"],
                                                                   self.options["max_pixels"])
        t, h, w = image_grid(path, settings)
        load_image(path).close()  # decoded once now: a truncated file shows only when its pixels are read
        self.conversation.attached.append(path)
        return t * h * w // settings.merge_size ** 2

    # -- commands --------------------------------------------------------------------------------

    def command_image(self, argument: str) -> None:
        from runtime.errors import PromptError

        try:
            paths = shlex.split(argument)
        except ValueError:  # an unbalanced quote: the whole argument is one path
            paths = [argument]
        if not paths:
            raise PromptError("/image needs a file: /image PATH")
        for path in paths:
            tokens = self.attach(path)
            self.note(f"attached {path} ({tokens} image tokens) to your next message")

    def command_reset(self, argument: str) -> None:
        self.conversation.reset()
        self.note("new conversation")

    def command_save(self, argument: str) -> None:
        from runtime.errors import PromptError

        if not argument:
            raise PromptError("/save needs a file: /save FILE")
        path = os.path.expanduser(argument)
        self.conversation.save(path)
        self.note(f"saved {len(self.conversation.messages)} messages to {path}")

    def command_load(self, argument: str) -> None:
        from runtime.errors import PromptError

        if not argument:
            raise PromptError("/load needs a file: /load FILE")
        path = os.path.expanduser(argument)
        self.conversation = Conversation.load(path)
        self.note(f"loaded {len(self.conversation.messages)} messages from {path}")

    def command_stats(self, argument: str) -> None:
        turns, context = self.conversation.user_turns, self.pipe.manifest.max_context
        size = self.prompt_tokens(self.conversation.messages) if self.conversation.messages else 0
        self.note(f"conversation: {turns} turn{'' if turns == 1 else 's'}, {size} tokens of the engine's context "
                  f"of {context}")
        last = self.last_turn
        if last:
            first = "no text" if last["first_text"] is None else f"first text after {last['first_text']:.2f} s"
            cached = f", {last['cached_tokens']} of them from the cache" if last["cached_tokens"] else ""
            self.note(f"last answer: {last['prompt_tokens']} prompt tokens{cached}; {first}, "
                      f"{last['seconds']:.2f} s in all{' (stopped)' if last['stopped'] else ''}")

    def command_help(self, argument: str) -> None:
        self.note(HELP)


def stream_answer(pieces, write) -> tuple[str, float | None, bool]:
    """Prints the answer's pieces as they come: (the answer, when its first text came, whether
    Ctrl-C stopped it). The generator is always closed, so the Pipeline's lock is released."""
    parts, first_text, stopped = [], None, False
    with StopOnInterrupt() as interrupt:
        try:
            for piece in pieces:
                if first_text is None:
                    first_text = time.perf_counter()
                parts.append(piece)
                write(piece)
                if interrupt.requested:
                    stopped = True
                    break
        except KeyboardInterrupt:  # the second Ctrl-C
            stopped = True
        finally:
            pieces.close()
    return "".join(parts), first_text, stopped


class StopOnInterrupt:
    """While an answer streams: the first Ctrl-C asks it to stop at the next piece (the runtime is
    left between two steps, never in the middle of one); a second one raises KeyboardInterrupt."""

    def __enter__(self) -> "StopOnInterrupt":
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._interrupted)
        return self

    def _interrupted(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


# Control characters would move the cursor or start escape sequences: shown as ^X / \x9b instead.
_SHOWN_CONTROLS = {**{c: f"^{chr(c + 64)}" for c in range(32) if chr(c) not in "\n\t"}, 0x7F: "^?",
                   **{c: f"\\x{c:02x}" for c in range(0x80, 0xA0)}}


def terminal_safe(text: str) -> str:
    """`text` as a terminal should show it: newlines and tabs kept, other control characters visible."""
    return text.translate(_SHOWN_CONTROLS)


def _cached_tokens(pipe) -> int | None:
    """Prompt tokens served from the Pipeline's prefix cache so far, where it has one."""
    cache = getattr(pipe, "prefix_cache", None)
    stats = cache.stats() if cache is not None and hasattr(cache, "stats") else None
    if not isinstance(stats, dict):
        return None
    return sum(stats.get(kind, {}).get("cached_tokens", 0) for kind in ("text", "image"))


def _line_editing(history: str | None):
    """readline for input() (editing, history, Tab completion of commands and paths), or None where
    the platform has no readline: the chat works without it."""
    try:
        import readline
    except ImportError:
        return None
    if history:
        try:
            if not os.path.exists(history):  # the history holds what was typed: the user's eyes only
                os.close(os.open(history, os.O_WRONLY | os.O_CREAT, 0o600))
            readline.read_history_file(history)
        except OSError:
            pass
    readline.set_history_length(1000)
    readline.set_completer_delims(" \t\n")
    readline.set_completer(_completer(readline))
    libedit = "libedit" in (readline.__doc__ or "")
    readline.parse_and_bind("bind ^I rl_complete" if libedit else "tab: complete")
    return readline


def _completer(readline):
    import glob

    names = ["/image", "/reset", "/save", "/load", "/stats", "/help", "/quit"]

    def complete(text: str, state: int) -> str | None:
        line = readline.get_line_buffer()
        if " " not in line.lstrip():
            matches = [name + " " for name in names if name.startswith(text)]
        elif line.split()[0] in ("/image", "/save", "/load"):
            matches = [path + ("/" if os.path.isdir(path) else "")
                       for path in sorted(glob.glob(os.path.expanduser(text) + "*"))]
        else:
            matches = []
        return matches[state] if state < len(matches) else None

    return complete


def _save_history(readline, history: str) -> None:
    try:
        readline.write_history_file(history)
    except OSError:
        pass  # a read-only home must not turn leaving into an error
