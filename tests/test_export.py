"""The agip-sparse export (agip/export.py): bit-exact round trips, sizes by the format's
formula, loud failures everywhere else, atomic writes, and the CLI around it."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import agip  # noqa: E402
from agip import checkpoint, export  # noqa: E402


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=4096, n_embd=128, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)  # Conv1D weights (in, out), tied lm_head


def prune(model, sparsity):
    """Masks for the prunable weights (random, or the 2 largest of every 4 along the input);
    the weights are zeroed where the mask is 0, as AGIP leaves them."""
    g = torch.Generator().manual_seed(1)
    masks = {}
    for group in agip.param_groups(model):
        if not group["prune"]:
            continue
        for (name, p), dim in zip(group["params"], group["input_dims"]):
            if sparsity == "2:4":
                rows = p.detach().abs().movedim(dim, -1)
                top = rows.reshape(-1, 4).topk(2, dim=1).indices
                keep = torch.zeros(rows.numel() // 4, 4, dtype=torch.bool).scatter_(1, top, True)
                mask = keep.reshape(rows.shape).movedim(-1, dim).contiguous()
            else:
                mask = torch.rand(p.shape, generator=g) >= sparsity
            with torch.no_grad():
                p.masked_fill_(~mask, 0)
            masks[name] = mask
    return masks


def make_checkpoint(tmp_path, arch="llama", sparsity=0.5):
    model = {"llama": llama, "gpt2": gpt2}[arch]()
    masks = prune(model, sparsity)
    path = str(tmp_path / f"ckpt-{arch}")
    checkpoint.save(path, model, None, masks=masks, state={"step": 1})
    return path, model, masks


def same_weights(a: dict, model, dtype):
    got = model.state_dict()
    for name, t in a.items():
        want = t.to(dtype) if t.is_floating_point() else t
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9, "2:4"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_round_trip_is_bit_exact_and_sizes_follow_the_formula(tmp_path, arch, dtype, sparsity):
    src, model, masks = make_checkpoint(tmp_path, arch, sparsity)
    out = str(tmp_path / "export")
    res = export.export(src, out, dtype=dtype)
    loaded = agip.load_sparse(out)
    same_weights(checkpoint.full_state(model), loaded, export.DTYPES[dtype])
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    # the file is the format's formula (bits + kept values, dense tensors whole) plus its small header
    size = os.path.getsize(os.path.join(out, export.SPARSE_FILE))
    assert res["bytes"] == size and res["tensor_bytes"] <= size <= 1.01 * res["tensor_bytes"]
    info = res["tensors"]
    for name, mask in masks.items():
        assert info[name]["layout"] == "bitmask"
        assert info[name]["sparsity"] == pytest.approx(1 - mask.float().mean().item())
        if sparsity == "2:4":
            assert info[name]["nm"] == "2:4"
        elif sparsity < 0.75:  # random masks this dense keep more than half of some group
            assert info[name]["nm"] is None
        elif info[name]["nm"]:  # at 90% every 8 may keep <= 4: then it says so, and it holds
            n, m = map(int, info[name]["nm"].split(":"))
            assert int(mask.movedim(-1 if arch == "llama" else 0, -1).reshape(-1, m).sum(1).max()) <= m - n
    assert all(info[n]["layout"] == "dense" for n in info if n not in masks)


def test_logits_equal_those_of_the_unpacked_folder(tmp_path):
    src, _, _ = make_checkpoint(tmp_path, "llama", 0.5)
    out, dense = str(tmp_path / "export"), str(tmp_path / "dense")
    export.export(src, out)
    export.unpack(out, dense)
    x = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = agip.load_sparse(out)(x).logits
        b = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)(x).logits
    assert torch.equal(a, b)


def test_plain_from_pretrained_refuses_the_export(tmp_path):
    src, _, _ = make_checkpoint(tmp_path, "gpt2", 0.5)
    out = str(tmp_path / "export")
    export.export(src, out)
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in config and "sparsity_config" not in config
    with pytest.raises((OSError, ValueError)):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_an_interrupted_export_leaves_nothing_that_loads(tmp_path, monkeypatch):
    src, _, _ = make_checkpoint(tmp_path, "llama", 0.5)
    out = tmp_path / "export"

    def crash(folder):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(export, "fsync_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        export.export(src, str(out))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []
    # with --overwrite, a crash keeps the complete old export
    monkeypatch.undo()
    export.export(src, str(out), dtype="bf16")
    monkeypatch.setattr(export, "fsync_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        export.export(src, str(out), overwrite=True)
    assert agip.load_sparse(str(out)).get_input_embeddings().weight.dtype == torch.bfloat16


def test_masks_from_zeros_for_a_plain_folder(tmp_path):
    model = gpt2()
    masks = prune(model, 0.5)
    plain = str(tmp_path / "plain")
    model.save_pretrained(plain)
    with pytest.raises(FileNotFoundError, match="--masks zeros"):
        export.export(plain, str(tmp_path / "e1"))
    res = export.export(plain, str(tmp_path / "e2"), masks="zeros")
    assert res["zeros_found"] == sum(int((~m).sum()) for m in masks.values())
    same_weights(checkpoint.full_state(model), agip.load_sparse(str(tmp_path / "e2")), torch.float32)


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    src, _, masks = make_checkpoint(tmp_path, "llama", 0.5)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        export.export(str(tmp_path / "nothing"), str(tmp_path / "o1"))
    with pytest.raises(ValueError, match="unknown dtype"):
        export.export(src, str(tmp_path / "o2"), dtype="fp8")
    with pytest.raises(ValueError, match="unknown format"):
        export.export(src, str(tmp_path / "o3"), format="gguf")
    export.export(src, str(tmp_path / "o4"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export(src, str(tmp_path / "o4"))
    from safetensors.torch import save_file

    name = next(iter(masks))
    save_file({name: torch.ones(3, 5, dtype=torch.bool)}, os.path.join(src, "masks.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        export.export(src, str(tmp_path / "o5"))
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3, 5))


def test_a_damaged_export_is_a_clear_error_never_a_half_loaded_model(tmp_path):
    from safetensors.torch import load_file, save_file

    src, _, _ = make_checkpoint(tmp_path, "llama", 0.5)
    out = str(tmp_path / "export")
    export.export(src, out)
    file = os.path.join(out, export.SPARSE_FILE)
    blob = open(file, "rb").read()
    with open(file, "wb") as f:  # truncated
        f.write(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="damaged or truncated"):
        agip.load_sparse(out)
    with open(file, "wb") as f:
        f.write(blob)
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(file)
    values = next(k for k in tensors if k.endswith(".values"))
    save_file({**tensors, values: tensors[values][:-1]}, file, metadata=meta)
    with pytest.raises(ValueError, match="kept entries in its bitmask"):
        agip.load_sparse(out)
    save_file(tensors, file, metadata={**meta, "format_version": "9"})
    with pytest.raises(ValueError, match="version '9'"):
        agip.load_sparse(out)


def test_cli_export_eval_and_unpack(gpt2_dir, corpus_dir, tmp_path, capsys):
    from agip.cli import main

    run = str(tmp_path / "run")
    assert main(["finetune", "--model", gpt2_dir, "--dataset", corpus_dir, "--out", run, "--steps", "3",
                 "--batch-size", "2", "--block-size", "32", "--eval-max-tokens", "512", "--target-sparsity", "0.5",
                 "--no-progress", "--export"]) == 0
    report = json.load(open(os.path.join(run, "report.json")))
    assert report["export"]["bytes"] < report["export"]["checkpoint_bytes"]
    capsys.readouterr()
    assert main(["eval", os.path.join(run, "checkpoint"), "--dataset", corpus_dir, "--max-tokens", "512",
                 "--no-progress"]) == 0
    from_ckpt = capsys.readouterr().out
    assert main(["export", os.path.join(run, "checkpoint"), str(tmp_path / "e"), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "e"), "--dataset", corpus_dir, "--max-tokens", "512", "--no-progress"]) == 0
    from_export = capsys.readouterr().out
    assert from_export.split(";")[0] == from_ckpt.split(";")[0]  # the same perplexity, to the last digit printed
    assert main(["unpack", str(tmp_path / "e"), str(tmp_path / "d")]) == 0
    assert main(["export", os.path.join(run, "checkpoint"), str(tmp_path / "e")]) == 2  # exists: refused
    assert "--overwrite" in capsys.readouterr().err


def test_a_mask_that_would_cost_more_than_it_saves_is_stored_dense(tmp_path):
    model = llama()
    masks = prune(model, 0.5)
    name = next(iter(masks))
    masks[name] = torch.ones_like(masks[name])  # nothing pruned: 1 bit per entry for nothing
    src = str(tmp_path / "ckpt")
    checkpoint.save(src, model, None, masks=masks, state={})
    res = export.export(src, str(tmp_path / "e"))
    assert res["tensors"][name]["layout"] == "dense" and res["tensors"][name]["sparsity"] == 0
    same_weights(checkpoint.full_state(model), agip.load_sparse(str(tmp_path / "e")), torch.float32)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_every_file_is_written_as_the_umask_allows_with_a_model_card(tmp_path, umask):
    """The export folder, its files and a checkpoint get the modes of any tool's writes (safetensors
    writes 0600 and mkdtemp makes 0700 on their own), and the folder says what it is."""
    src, _, masks = make_checkpoint(tmp_path, "llama", "2:4")
    old = os.umask(umask)
    try:
        out = str(tmp_path / "export")
        export.export(src, out)
        ckpt = str(tmp_path / "ckpt-again")
        checkpoint.save(ckpt, agip.load_sparse(out), None, masks=masks, state={"step": 1})
    finally:
        os.umask(old)
    for folder in (out, os.path.realpath(ckpt)):
        assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask, folder
        for f in os.listdir(folder):
            assert os.stat(os.path.join(folder, f)).st_mode & 0o777 == 0o666 & ~umask, f
    card = open(os.path.join(out, export.CARD_FILE), encoding="utf-8").read()
    assert "agip-sparse" in card and "format version 1" in card and "agip.load_sparse" in card
    assert "agip unpack" in card and "**2:4** in every pruned matrix" in card and "**50.0% of them pruned**" in card
    dense = str(tmp_path / "dense")
    export.unpack(out, dense)
    assert not os.path.exists(os.path.join(dense, export.CARD_FILE))  # the card describes the sparse folder only
