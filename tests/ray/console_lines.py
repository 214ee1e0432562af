"""What a harma command printed that is not harma's: the console check of the Ray-tier tests that
run a command as a user does (a subprocess against the shared cluster)."""

import re

# harma's console format (harma.cli._setup_logging): the time, then a message, which may be indented
HARMA_LOG_LINE = r"^\d\d:\d\d:\d\d +\S"


def foreign_lines(output: str, summary_lines: tuple[str, ...]) -> list[str]:
    """Lines of `output` that are neither harma log lines nor match one of the command's own
    closing-summary patterns (regexes matched at the line's start)."""
    return [line for line in output.splitlines() if not re.match(HARMA_LOG_LINE, line)
            and not any(re.match(p, line) for p in summary_lines)]


def harma_lines(output: str) -> list[str]:
    """harma's own log lines of `output`."""
    return [line for line in output.splitlines() if re.match(HARMA_LOG_LINE, line)]
