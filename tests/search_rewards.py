"""Rule rewards for the `expo search` tests (importable as --reward-fn search_rewards:NAME)."""

import os
import signal


def count_w7(prompt: str, response: str) -> float:
    """More w7 is better; longer is slightly better."""
    words = response.split()
    return words.count("w7") + 0.01 * len(words)


def word_sum(prompt: str, response: str) -> float:
    """The words' numbers summed (w12 w40 -> 0.52): a score that tells almost any two responses apart."""
    return sum(int(w[1:]) for w in response.split() if w[1:].isdigit()) / 100


def kill_after(prompt: str, response: str) -> float:
    """count_w7 (or the reward EXPO_TEST_REWARD names), but SIGKILL this process at the Nth call (N from
    EXPO_TEST_KILL_AFTER; counted in a file)."""
    path = os.environ["EXPO_TEST_KILL_COUNT"]
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as f:
        f.write(str(n))
    if n == int(os.environ["EXPO_TEST_KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return globals()[os.environ.get("EXPO_TEST_REWARD", "count_w7")](prompt, response)


def broken(prompt: str, response: str) -> float:
    raise RuntimeError("the reward server is down")


def not_a_number(prompt: str, response: str):
    return "high"


def shorter_is_better(prompt: str, response: str) -> float:
    """An empty response scores best: what a search must not be fooled by when overflow empties the responses."""
    return -float(len(response.split()))
