"""Under load: adapters switched 200 times from another thread while comparisons stream.

The window runs switches and comparisons as jobs on worker threads; the core's session lock is what
keeps a switch from landing in the middle of a generation. Every streamed column must be the output of
the variant it is labelled with (equal to that variant run alone), the session must end in the state the
last switch left, and nothing may crash or deadlock (every join has a timeout).
"""

from __future__ import annotations

import threading
import time

import pytest

from lora_studio.core.compare import Variant, compare
from lora_studio.core.generation.generate import GenerationSettings, generate
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.session import Session

SWITCHES = 200
SETTINGS = GenerationSettings(max_new_tokens=6)
PROMPTS = ["hello world", "The quick brown fox"]


@pytest.fixture(scope="module")
def loaded(one_thread, tiny_llama, llama_adapters):
    s = Session()
    s.load(resolve_source(tiny_llama))
    s.attach(llama_adapters["alpha"], "alpha")
    s.attach(llama_adapters["beta"], "beta")
    yield s
    s.close()


def alone(session, name, prompt):
    if name == "base":
        session.disable_adapters()
    else:
        session.activate(name)
    return generate(session.model, session.tokenizer, prompt, SETTINGS).token_ids


def test_switching_200_times_while_comparing(loaded):
    session = loaded
    expected = {(i, n): alone(session, n, p) for i, p in enumerate(PROMPTS) for n in ("base", "alpha", "beta")}
    assert len({tuple(v) for v in expected.values()}) == 6, "the variants must differ for the labels to mean anything"

    done = threading.Event()
    errors: list[BaseException] = []
    switched = [0]
    last = ["beta"]

    def switcher():
        try:
            for k in range(SWITCHES):
                choice = ("alpha", "beta", None)[k % 3]
                if choice is None:
                    session.disable_adapters()
                else:
                    session.activate(choice)
                last[0] = choice
                switched[0] += 1
                time.sleep(0.0005)  # let the comparison thread in between switches
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    runs = []

    def comparer():
        try:
            while not done.is_set() or len(runs) < 3:
                variants = [Variant.base(), Variant.of_adapter("alpha"), Variant.of_adapter("beta")]
                mixed = len(runs) % 2 == 0  # alternate one mixed batch and one run per variant
                streamed: dict = {}

                def on_tokens(delta, streamed=streamed):
                    streamed.setdefault((delta.prompt_index, delta.variant), []).extend(delta.token_ids)
                    if delta.token_ids and len(streamed) == 1:
                        time.sleep(0.001)  # a slow consumer (the GUI) gives the switcher time to try to get in

                result = compare(session, variants, PROMPTS, SETTINGS, score=False, mixed=mixed, on_tokens=on_tokens)
                runs.append((mixed, result, streamed))
                time.sleep(0.01)  # the gap between two jobs, where queued switches get the lock
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=switcher, name="switcher"), threading.Thread(target=comparer, name="comparer")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
    assert not errors, errors
    assert switched[0] == SWITCHES and len(runs) >= 3
    print(f"{len(runs)} comparisons while {SWITCHES} switches ran")
    assert {m for m, _, _ in runs} == {True, False}
    for mixed, result, streamed in runs:
        for i, cmp in enumerate(result.prompts):
            for out in cmp.outputs:
                assert out.token_ids == expected[(i, out.name)], (mixed, i, out.name)
                assert streamed[(i, out.name)] == out.token_ids  # streamed under the same label
    # the state the last switch left, untouched by the comparisons that ran in between
    assert session.active_adapter == last[0]
    session.activate("alpha")
    assert alone(session, "alpha", PROMPTS[0]) == expected[(0, "alpha")]
