"""Converter sources named by URL, offline: Hub files (`hf://`, resolve / blob URLs, revisions) from a Hub cache laid
out as huggingface_hub lays it out, plain URLs from torch.hub's cache with a SHA-256 check, full-size parity with an
independent reference, the one-line error for an uncached file, and the README's model-zoo commands."""

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

import convert_checkpoint
from alibi_dinov2.cli import run_command
from alibi_dinov2.conversion.convert import convert
from alibi_dinov2.errors import InputError
from alibi_dinov2.hub.remote_files import fetch_file, is_remote_file, parse_remote_file, url_cache_path
from conftest import REPO_ROOT
from hub_cache import put_in_hub_cache
from modeling_alibi_dinov2 import AlibiDinov2Model
from test_convert_checkpoint import VITS14, hf_model, pixels, reference_vit_forward, timm_checkpoint, to_vit_keys


RELEASE_REPO = "rmdocherty/dino-saw"
ALIBI_COCO = "alibi_coco_dv2_vits14_reg4.pth"
META_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"
FULL_SIZE_INPUT = (196, 154)  # a 14 x 11 patch grid: rows and columns differ


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Full-size ViT-S/14-reg4 files with random weights: the reference ALiBi release (timm layout, zero position
    embedding, 175 keys) and Meta's `dinov2_vits14_reg4_pretrain.pth` (176 keys) with the transformers model it
    was written from."""
    folder = tmp_path_factory.mktemp("released")
    timm = timm_checkpoint(VITS14)
    meta_model = hf_model(VITS14, seed=1)
    meta = to_vit_keys(meta_model, "meta")
    assert (len(timm), len(meta)) == (175, 176)
    torch.save(timm, folder / ALIBI_COCO)
    torch.save(meta, folder / Path(META_URL).name)
    return SimpleNamespace(timm=timm, timm_path=folder / ALIBI_COCO, meta=meta, meta_model=meta_model,
                           meta_path=folder / Path(META_URL).name)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache that both the environment and huggingface_hub's constants (read at import) point to."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


def max_error_to_reference(model, state_dict, slopes):
    x = pixels(*FULL_SIZE_INPUT, batch=1)
    with torch.no_grad():
        return (model(x).last_hidden_state - reference_vit_forward(state_dict, x, 6, slopes)).abs().max().item()


def command(*args, env=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO_ROOT / "convert_checkpoint.py"), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


# --- Hub files ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_hf_file_converts_offline_from_the_hub_cache_at_full_size(tmp_path, released, hub_cache):
    put_in_hub_cache(hub_cache, RELEASE_REPO, {ALIBI_COCO: released.timm_path})
    output = tmp_path / "alibi-coco"
    result = command(f"hf://{RELEASE_REPO}/{ALIBI_COCO}", output, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AlibiDinov2Model.from_pretrained(output).eval()
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert config.use_alibi and not config.use_absolute_position_embeddings and config.num_register_tokens == 4
    assert (config.alibi_slopes, config.alibi_metric, config.alibi_wrap, config.alibi_normalize) == (
        "constant", "euclidean", True, True)
    assert max_error_to_reference(model, released.timm, torch.ones(12, 6)) < 1e-4
    assert f"hf://{RELEASE_REPO}/{ALIBI_COCO}" in (output / "README.md").read_text()


def test_hub_file_urls_and_revisions(tmp_path, hub_cache):
    put_in_hub_cache(hub_cache, RELEASE_REPO, {"weights.pth": b"main"}, revision="main")
    tagged = put_in_hub_cache(hub_cache, RELEASE_REPO, {"sub/weights.pth": b"v1", "weights.pth": b"v1"}, revision="v1")
    cases = [
        (f"hf://{RELEASE_REPO}/weights.pth", None, b"main"),
        (f"hf://{RELEASE_REPO}/weights.pth", "v1", b"v1"),
        (f"hf://{RELEASE_REPO}/weights.pth", tagged.name, b"v1"),  # a commit hash
        (f"hf://{RELEASE_REPO}@v1/sub/weights.pth", None, b"v1"),
        (f"https://huggingface.co/{RELEASE_REPO}/resolve/v1/weights.pth", None, b"v1"),
        (f"https://huggingface.co/{RELEASE_REPO}/blob/main/weights.pth?download=true", None, b"main"),
        (f"https://huggingface.co/{RELEASE_REPO}/resolve/main/weights.pth", "main", b"main"),
    ]
    for source, revision, expected in cases:
        assert Path(fetch_file(source, revision=revision)).read_bytes() == expected, source
    assert Path(fetch_file(f"hf://{RELEASE_REPO}/weights.pth", cache_dir=hub_cache)).read_bytes() == b"main"
    remote = parse_remote_file("https://huggingface.co/datasets/someone/data/resolve/main/a%20b.pth")
    assert (remote.repo_type, remote.repo_id, remote.filename, remote.revision) == (
        "dataset",
        "someone/data",
        "a b.pth",
        "main",
    )
    with pytest.raises(InputError, match="names revision 'v1', but --revision is 'main'"):
        fetch_file(f"hf://{RELEASE_REPO}@v1/weights.pth", revision="main")
    with pytest.raises(InputError, match="names a repository, not a file"):
        fetch_file(f"hf://{RELEASE_REPO}")


def test_a_released_nope_file_keeps_its_scheme_through_a_hub_name(tmp_path, tiny_kwargs, hub_cache):
    path = tmp_path / "nope.pth"
    torch.save(timm_checkpoint(tiny_kwargs), path)
    put_in_hub_cache(hub_cache, RELEASE_REPO, {"nope_coco_dv2_vits14_reg4.pth": path})
    model = convert(f"hf://{RELEASE_REPO}/nope_coco_dv2_vits14_reg4.pth", variant="keep-pe", num_heads=2)
    assert not model.config.use_alibi and not model.config.use_absolute_position_embeddings


# --- plain URLs -----------------------------------------------------------------------------------------------------


def test_meta_url_converts_from_the_torch_hub_cache_at_full_size(tmp_path, released, torch_home):
    cached = url_cache_path(META_URL)
    assert cached == torch_home / "hub" / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth"
    cached.parent.mkdir(parents=True)
    shutil.copy(released.meta_path, cached)
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    model = convert_checkpoint.main([META_URL, str(tmp_path / "alibi"), "--sha256", digest])
    assert model.config.use_alibi and not model.config.use_absolute_position_embeddings
    # The ALiBi retrofit drops Meta's learned embedding: the reference runs the same weights without it.
    bare = {
        key: value for key, value in released.meta.items() if key not in ("pos_embed", "mask_token", "register_tokens")
    }
    bare["reg_token"] = released.meta["register_tokens"]
    assert max_error_to_reference(model, bare, torch.ones(12, 6)) < 1e-4
    stock = convert(META_URL, variant="keep-pe")
    x = pixels(*FULL_SIZE_INPUT, batch=1)
    with torch.no_grad():
        error = (stock(x).last_hidden_state - released.meta_model(x).last_hidden_state).abs().max().item()
    assert error < 1e-4


def test_a_plain_url_is_downloaded_once_and_checked(tmp_path, torch_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    downloads = []

    def download(url, destination, hash_prefix=None, progress=True):
        downloads.append(url)
        Path(destination).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    url = "https://example.org/files/weights.pth"
    digest = hashlib.sha256(b"weights").hexdigest()
    assert fetch_file(url, sha256=digest) == fetch_file(url, sha256=digest.upper()) == url_cache_path(url)
    assert downloads == [url]
    with pytest.raises(InputError, match=f"SHA-256 of .* is {digest}, not the expected 0000"):
        fetch_file(url, sha256="0" * 64)
    assert url_cache_path(url).exists()  # a cached file that fails the check is left for the user
    url_cache_path(url).unlink()
    with pytest.raises(InputError, match="SHA-256"):
        fetch_file(url, sha256="0" * 64)
    assert not url_cache_path(url).exists() and len(downloads) == 2  # a download that fails it is removed
    with pytest.raises(InputError, match="--revision applies to Hub files"):
        fetch_file(url, revision="v1")
    with pytest.raises(InputError, match="64 hexadecimal digits"):
        fetch_file(url, sha256="abc")


# --- offline misses -------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_uncached_files_offline_fail_with_one_line_naming_them(tmp_path, hub_cache, torch_home, capsys):
    source = f"hf://{RELEASE_REPO}/nope_coco_dv2_vits14_reg4.pth"
    result = command(source, tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"convert_checkpoint.py: error: not in the cache: {source} (")
    assert "nope_coco_dv2_vits14_reg4.pth of rmdocherty/dino-saw at revision main; HF_HUB_OFFLINE is set" in last

    with pytest.raises(SystemExit) as exit_info:
        run_command(convert_checkpoint.main, [META_URL, str(tmp_path / "out")], prog="alibi-convert")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"alibi-convert: error: not in the cache: {META_URL} "
        f"(HF_HUB_OFFLINE is set; looked for {url_cache_path(META_URL)})\n"
    )
    assert not (tmp_path / "out").exists()


# --- the README's model zoo -----------------------------------------------------------------------------------------


def test_every_model_zoo_command_parses_and_names_a_known_source():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Model zoo\n", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"`(python convert_checkpoint\.py [^`]+)`", section)
    for name in ("alibi_dv2_vits14_reg4.pth", ALIBI_COCO, "nope_coco_dv2_vits14_reg4.pth",
                 "alibi_coco_dv3_vits16_plus_reg4.pth", "python -m evaluation.publish"):
        assert name in section
    for size in ("vits14", "vitb14", "vitl14", "vitg14"):
        assert any(f"/dinov2_{size}_reg4_pretrain.pth" in line for line in commands), size
    for size in ("small", "base", "large", "giant"):
        assert any(f"facebook/dinov2-with-registers-{size} " in line for line in commands), size
    for size in ("vits16", "vits16plus", "vitb16", "vitl16", "vith16plus", "vit7b16"):
        assert any(f"facebook/dinov3-{size}-pretrain-lvd1689m " in line for line in commands), size
    assert any(f"hf://{RELEASE_REPO}/alibi_coco_dv3_vits16_plus_reg4.pth " in line for line in commands)
    for line in commands:
        args = convert_checkpoint.parse_args(shlex.split(line)[2:])
        assert is_remote_file(args.source) or args.source.startswith(("facebook/dinov2", "facebook/dinov3")), line
        if "nope" in args.source:
            assert args.variant in ("keep-pe", "nope"), line


# --- DINOv3 ---------------------------------------------------------------------------------------------------------


ALIBI_DINOV3 = "alibi_coco_dv3_vits16_plus_reg4.pth"
VITS16_PLUS = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_released_alibi_dinov3_converts_offline_from_the_hub_cache_at_full_size(tmp_path, hub_cache):
    """A full-size ViT-S+/16-reg4 in the reference ALiBi-DINOv3 layout (Meta's dinov3 keys, no RoPE, 211 keys) with
    random weights, from the Hub cache by its `hf://` name, against the eager reference to 1e-4."""
    from modeling_alibi_dinov3 import AlibiDinov3Model
    from test_convert_dinov3 import hf_dinov3, reference_dinov3_forward, to_meta_dinov3_keys

    state_dict = to_meta_dinov3_keys(hf_dinov3(gated=True, **VITS16_PLUS), rope=False)
    assert len(state_dict) == 211 and "rope_embed.periods" not in state_dict
    torch.save(state_dict, tmp_path / ALIBI_DINOV3)
    put_in_hub_cache(hub_cache, RELEASE_REPO, {ALIBI_DINOV3: tmp_path / ALIBI_DINOV3})
    output = tmp_path / "alibi-dinov3"
    result = command(f"hf://{RELEASE_REPO}/{ALIBI_DINOV3}", output, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AlibiDinov3Model.from_pretrained(output).eval()
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        384, 12, 6, 1536)
    assert config.use_gated_mlp and config.use_alibi and not config.use_rope and config.num_register_tokens == 4
    assert (config.alibi_slopes, config.alibi_metric, config.alibi_wrap, config.alibi_normalize) == (
        "constant", "euclidean", True, True)
    x = pixels(96, 80, batch=1)  # a 6 x 5 grid
    with torch.no_grad():
        error = (
            (model(x).last_hidden_state - reference_dinov3_forward(state_dict, x, 6, torch.ones(12, 6))).abs().max()
        )
    assert error.item() < 1e-4


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("hub_id, gated", [("facebook/dinov3-vits16-pretrain-lvd1689m", False),
                                           ("facebook/dinov3-vits16plus-pretrain-lvd1689m", True)])
def test_dinov3_hub_ids_convert_offline_from_the_hub_cache(tmp_path, hub_cache, hub_id, gated):
    from hub_cache import put_folder_in_hub_cache
    from modeling_alibi_dinov3 import AlibiDinov3Model
    from test_convert_dinov3 import hf_dinov3

    source = hf_dinov3(gated=gated)
    source.save_pretrained(tmp_path / "source")
    put_folder_in_hub_cache(hub_cache, hub_id, tmp_path / "source")
    for variant in ("keep-pe", "alibi"):
        result = command(hub_id, tmp_path / variant, "--variant", variant, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    stock = AlibiDinov3Model.from_pretrained(tmp_path / "keep-pe").eval()
    assert stock.config.use_rope and not stock.config.use_alibi and stock.config.use_gated_mlp == gated
    x = pixels(64, 48)
    with torch.no_grad():
        torch.testing.assert_close(stock(x).last_hidden_state, source(x).last_hidden_state, atol=1e-5, rtol=0)
    alibi = AlibiDinov3Model.from_pretrained(tmp_path / "alibi")
    assert alibi.config.use_alibi and not alibi.config.use_rope
    assert all(torch.equal(tensor, source.state_dict()[name]) for name, tensor in alibi.state_dict().items())
    assert f"base_model: {hub_id}" in (tmp_path / "alibi" / "README.md").read_text()
