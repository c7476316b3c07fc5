"""Explicit lifetimes and self-registering, self-locking renderers (issue 12, items 5 and 7)."""

from __future__ import annotations

import subprocess
import sys
import threading

import httpx
import pytest
import tinker

from dpo_core import backend, rendering
from dpo_core.settings import Settings
from tests.helpers.threads import run_on_threads

TINY = "local/tiny"
PROMPT = [{"role": "user", "content": "Name a colour."}]


def _server_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "dpo-local-http" and t.is_alive())


def _sample_once(client: tinker.ServiceClient) -> None:
    sampler = client.create_sampling_client(base_model=TINY).result()
    sampler.sample(tinker.ModelInput.from_ints([1, 2, 3]), 1, tinker.SamplingParams(max_tokens=2, seed=0)).result()


def test_an_entered_backend_shares_one_server_until_it_exits(tmp_path, registered):
    settings = Settings(cache_dir=registered, local_storage=tmp_path / "storage")
    threads_before = _server_threads()
    with backend.Backend() as entered:
        assert backend.current_backend() is entered
        server = entered.local_server(settings)
        requests_before = server.engine.counters["sample_requests"]
        for _ in range(2):  # two tasks of one flow run, one after the other
            with backend.service_client(settings) as client:
                _sample_once(client)
        worker = threading.Thread(target=lambda: _sample_once_in_new_client(settings))  # a task in a thread
        worker.start()
        worker.join(timeout=120)
        assert entered.local_server(settings) is server
        assert server.engine.counters["sample_requests"] - requests_before == 3  # all three reached it
        assert _server_threads() == threads_before + 1
    assert backend.current_backend() is None
    assert _server_threads() == threads_before
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.base_url}/api/v1/healthz", headers={"X-API-Key": server.api_key}, timeout=2)


def _sample_once_in_new_client(settings: Settings) -> None:
    with backend.service_client(settings) as client:
        _sample_once(client)


def test_without_a_backend_a_client_block_owns_its_server(tmp_path, registered):
    settings = Settings(cache_dir=registered, local_storage=tmp_path / "storage")
    threads_before = _server_threads()
    with backend.service_client(settings) as client:
        assert _server_threads() == threads_before + 1
        _sample_once(client)
        assert backend.current_backend() is None  # private to the block: other threads cannot pick it up
    assert _server_threads() == threads_before


def test_renderers_register_themselves_on_first_use():
    code = ("from dpo_core import rendering\n"
            "renderer = rendering.get_renderer('local/tiny')\n"
            "print(rendering.renderer_name_for('local/tiny'), len(renderer.build_generation_prompt("
            "[{'role': 'user', 'content': 'hi'}]).to_ints()) > 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["dpo_suite/smollm2_chatml", "True"]


def test_renderer_calls_take_the_tokenizer_lock_themselves(registered):
    renderer = rendering.get_renderer(TINY)
    finished = threading.Event()

    def render() -> None:
        renderer.build_generation_prompt(PROMPT)
        renderer.tokenizer.decode([1, 2, 3])
        finished.set()

    with rendering.TOKENIZER_LOCK:
        thread = threading.Thread(target=render)
        thread.start()
        assert not finished.wait(0.5)  # waits for the lock held here
    assert finished.wait(30)
    thread.join()


def test_one_renderer_serves_many_threads_at_once(registered):
    renderer = rendering.get_renderer(TINY)
    conversations = [[{"role": "user", "content": f"Question {i}: " + "why? " * (i % 7)}] for i in range(40)]
    expected = [renderer.build_generation_prompt(c).to_ints() for c in conversations]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(offset, len(conversations), 8):
                tokens = renderer.build_generation_prompt(conversations[i]).to_ints()
                rendering.render_pair_tokens(renderer, conversations[i], [{"role": "assistant", "content": "ok"}])
                renderer.tokenizer.encode("x " * 50, add_special_tokens=False, truncation=True, max_length=8)
                results[i] = tokens
        except BaseException as exc:  # "Already borrowed" from an unlocked shared tokenizer lands here
            errors.append(exc)

    run_on_threads(work, [(k,) for k in range(8)])
    assert errors == []
    assert [results[i] for i in range(len(conversations))] == expected


def test_shared_backend_reuses_the_entered_one():
    with backend.shared_backend() as outer:
        with backend.shared_backend() as inner:  # a subflow inside a suite run
            assert inner is outer
        assert backend.current_backend() is outer  # the inner block did not end the outer lifetime
    assert backend.current_backend() is None
