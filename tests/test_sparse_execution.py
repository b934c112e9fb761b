"""Sparse execution computes what the masked dense FFN computes, without the masked work: the MGS group kernel
(compiled CPU kernel and PyTorch dispatch), the SIBS shrunk FFN, and the take-away gated DETR."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DetrForObjectDetection, DetrImageProcessorPil

from detr_sparsity.evaluation.detections import detect
from detr_sparsity.execution.gated_detr import (GatedFFN, SparseGatedFFN, gated_blocks, load_gated, load_gated_detr,
                                                save_gated, set_execution)
from detr_sparsity.execution.gated_ffn import KERNEL_MAX_TILE, PackedFFN, dispatch_ffn, kernel_tile, sparse_ffn
from detr_sparsity.execution import benchmark
from detr_sparsity.execution.cpu_kernel import (CFLAGS, LDFLAGS, build_key, cpu_flags, cpu_kernel, extension_name,
                                                instruction_sets)
from detr_sparsity.mgs.gates import make_gates, save_gates
from detr_sparsity.models.small_detr import build_small_detr, small_detr_config
from detr_sparsity.sparsity.ffn import ffn_blocks, sparse_ffns
from detr_sparsity.sparsity.policies import StaticMask
from detr_sparsity.sparsity.shrink import shrink_ffns

D, H, G = 32, 256, 16
ARCH = {"d_model": D, "ffn_dim": H, "encoder_layers": 2, "decoder_layers": 2, "attention_heads": 4,
        "num_queries": 10, "backbone_hidden_sizes": [8, 16, 32], "backbone_depths": [1, 1, 1], "dropout": 0.0}
CATEGORIES = [{"id": i + 1, "name": f"class{i}"} for i in range(4)]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def masked_dense(x, open_groups, fc1, fc2, group_size):
    """The reference: the study's computation, fc2(m * relu(fc1 x)) with m expanded over each group."""
    return fc2(torch.relu(fc1(x)) * open_groups.to(x.dtype).repeat_interleave(group_size, dim=-1))


def ffn_pair(d=D, hidden=H, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, hidden), nn.Linear(hidden, d)


# Every way of computing the sparse FFN on CPU: the dispatcher's choice, and each path forced.
PATHS = {
    "sparse_ffn": lambda x, m, p: sparse_ffn(x, m, p),
    "grouped_mm": lambda x, m, p: dispatch_ffn(x.reshape(-1, x.shape[-1]), m.reshape(-1, p.groups), p,
                                               grouped_mm=True).view(*x.shape),
    "padded_bmm": lambda x, m, p: dispatch_ffn(x.reshape(-1, x.shape[-1]), m.reshape(-1, p.groups), p,
                                               grouped_mm=False).view(*x.shape),
}


def masks(case: str, shape: tuple[int, ...], groups: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    if case == "random":
        return torch.rand(*shape, groups, generator=generator) > 0.7
    if case == "all_open":
        return torch.ones(*shape, groups, dtype=torch.bool)
    if case == "all_closed":
        return torch.zeros(*shape, groups, dtype=torch.bool)
    if case == "mixed_rows":  # some tokens open nothing, some everything, some one group; groups no token opens
        m = torch.rand(*shape, groups, generator=generator) > 0.5
        flat = m.view(-1, groups)
        flat[0::4] = False
        flat[1::4] = True
        flat[2::4, :] = False
        flat[2::4, 1] = True
        flat[:, -2:] = False
        return m
    raise ValueError(case)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", ["random", "all_open", "all_closed", "mixed_rows"])
@pytest.mark.parametrize("shape", [(37,), (3, 21), (1,), (0,), (2, 0)], ids=str)
def test_sparse_path_equals_masked_dense(path, case, shape):
    fc1, fc2 = ffn_pair()
    packed = PackedFFN(fc1, fc2, G)
    x = torch.randn(*shape, D)
    open_groups = masks(case, shape, H // G)
    with torch.no_grad():
        expected = masked_dense(x, open_groups, fc1, fc2, G)
        got = PATHS[path](x, open_groups, packed)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **TOLERANCE)


@pytest.mark.parametrize("group_size", [8, 32, 64, 4])  # 4 has no compiled kernel: the dispatch path runs
def test_other_group_sizes(group_size):
    fc1, fc2 = ffn_pair()
    x = torch.randn(50, D)
    open_groups = torch.rand(50, H // group_size) > 0.5
    with torch.no_grad():
        torch.testing.assert_close(sparse_ffn(x, open_groups, PackedFFN(fc1, fc2, group_size)),
                                   masked_dense(x, open_groups, fc1, fc2, group_size), **TOLERANCE)


@pytest.mark.parametrize("d_model", [8, 20, 40, 264])  # the kernel's fc2 holds y in chunks of 16, 4, 1 vectors
def test_widths_that_are_no_multiple_of_the_vector(d_model):
    fc1, fc2 = ffn_pair(d_model, 128)
    x = torch.randn(29, d_model)
    open_groups = torch.rand(29, 128 // G) > 0.4
    with torch.no_grad():
        torch.testing.assert_close(sparse_ffn(x, open_groups, PackedFFN(fc1, fc2, G)),
                                   masked_dense(x, open_groups, fc1, fc2, G), **TOLERANCE)


def test_detr_r50_block_shape_at_90_percent():
    fc1, fc2 = ffn_pair(256, 2048)
    x = torch.randn(850, 256)
    open_groups = torch.rand(850, 128) > 0.9
    with torch.no_grad():
        torch.testing.assert_close(sparse_ffn(x, open_groups, PackedFFN(fc1, fc2, 16)),
                                   masked_dense(x, open_groups, fc1, fc2, 16), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("tokens", "threads", "tile"), [
    (850, 2, 425),  # R50's encoder: one tile per thread
    (850, 1, 850),
    (100, 2, 50),   # R50's decoder queries
    (100, 1, 100),
    (5000, 2, 834),  # 6 tiles of at most 1024, 3 per thread (834 x 5 + 830)
    (2048, 2, 1024),
    (2049, 2, 513),
    (1, 2, 1),
    (0, 2, 1),
])
def test_kernel_tiles_are_equal_at_most_the_maximum_and_a_multiple_of_the_threads(tokens, threads, tile):
    assert kernel_tile(tokens, threads) == tile <= KERNEL_MAX_TILE
    count = -(-tokens // tile)
    assert tokens < threads or count % threads == 0


@pytest.mark.skipif(__import__("shutil").which("c++") is None, reason="no C++ compiler: the PyTorch path runs")
def test_the_kernels_output_does_not_depend_on_its_tile():
    """Each token's sums run in the same order whichever tile holds it: every tile gives the same bits."""
    fc1, fc2 = ffn_pair(256, 2048)
    packed = PackedFFN(fc1, fc2, 16)
    x = torch.randn(300, 256)
    mask = torch.rand(300, 128) > 0.9
    outputs = [sparse_ffn(x, mask, packed, tile=tile) for tile in (None, 1, 7, 16, 150, 256, 1000)]
    assert all(torch.equal(y, outputs[0]) for y in outputs[1:])
    torch.testing.assert_close(outputs[0], dispatch_ffn(x, mask, packed))  # and it is the gated FFN's result


@pytest.mark.skipif(__import__("shutil").which("c++") is None, reason="no C++ compiler: the PyTorch path runs")
def test_the_compiled_kernel_builds_where_a_compiler_exists():
    # Where a compiler exists the fast path must really be the one measured, not the fallback.
    assert cpu_kernel() is not None


def test_the_build_is_keyed_by_the_cpus_instruction_set(tmp_path):
    # A -march=native build cached in a shared home directory must never load on another kind of CPU.
    avx512 = frozenset({"fpu", "sse2", "avx", "avx2", "fma", "avx512f", "avx512bw"})
    avx2 = avx512 - {"avx512f", "avx512bw"}
    assert build_key(CFLAGS, avx512) != build_key(CFLAGS, avx2)
    assert build_key(CFLAGS, avx2) != build_key(CFLAGS, avx2 | {"avx_vnni"})
    assert build_key(CFLAGS, avx2) != build_key(CFLAGS[:1], avx2)  # other compile flags, another build
    assert build_key(CFLAGS, avx2) == build_key(CFLAGS, frozenset(sorted(avx2)))
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "fma"}
    assert cpu_flags(tmp_path / "absent") == frozenset()
    # This machine's name: its capability readable, its flags hashed (where /proc/cpuinfo exists).
    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert extension_name().startswith(f"detr_sparsity_gated_ffn_v2_{capability}_")
    if cpu_flags():
        key = build_key(CFLAGS + LDFLAGS, cpu_flags(), __import__("platform").machine())
        assert extension_name() == f"detr_sparsity_gated_ffn_v2_{capability}_{key}"


@pytest.mark.skipif(__import__("shutil").which("c++") is None, reason="no C++ compiler: the PyTorch path runs")
def test_the_compiled_module_lives_in_the_keyed_build_directory():
    from pathlib import Path

    assert Path(cpu_kernel().__file__).parent.name == extension_name()


def test_a_cpu_with_avx512_also_runs_the_avx2_build():
    avx512 = frozenset({"sse2", "avx", "avx2", "fma", "avx512f", "avx512bw"})
    assert instruction_sets(avx512) == ("native", "avx2")
    assert instruction_sets(avx512 - {"avx512f", "avx512bw"}) == ("native",)  # native is the AVX2 build there
    assert instruction_sets(frozenset({"fp", "asimd"})) == ("native",)  # an Arm CPU
    with pytest.raises(ValueError, match="instruction_set = 'avx9' is not allowed: allowed values: native, avx2"):
        cpu_kernel("avx9")


@pytest.mark.skipif(__import__("shutil").which("c++") is None, reason="no C++ compiler: the PyTorch path runs")
@pytest.mark.skipif("avx2" not in instruction_sets(), reason="no AVX-512 here: the native build is the AVX2 one")
def test_the_avx2_build_computes_the_gated_ffn_on_a_cpu_with_avx512():
    """The code path of the AVX2 machine class (8-float vectors), compiled and checked on a CPU with AVX-512."""
    from pathlib import Path

    kernel = cpu_kernel("avx2")
    name = extension_name("avx2")
    assert Path(kernel.__file__).parent.name == name and name.startswith("detr_sparsity_gated_ffn_v2_avx2_")
    assert name != extension_name()
    fc1, fc2 = ffn_pair(256, 2048)
    packed = PackedFFN(fc1, fc2, 16)
    x = torch.randn(300, 256)
    mask = torch.rand(300, 128) > 0.9
    with torch.no_grad():
        y = kernel.gated_ffn(x, mask, packed.weights, packed.b1g.view(-1), packed.b2, 150)
        torch.testing.assert_close(y, masked_dense(x, mask, fc1, fc2, 16), rtol=1e-4, atol=1e-4)


def test_a_mask_that_does_not_fit_is_refused():
    packed = PackedFFN(*ffn_pair(), G)
    with pytest.raises(ValueError, match="does not fit"):
        sparse_ffn(torch.randn(5, D), torch.ones(5, H // G + 1, dtype=torch.bool), packed)


def test_a_group_size_that_does_not_divide_the_width_is_refused():
    with pytest.raises(ValueError, match="group_size = 24 is not allowed"):
        PackedFFN(*ffn_pair(), 24)


# ---------------------------------------------------------------- SIBS: the physically shrunk FFN

# A block with nothing left gets 0-neuron layers, whose initialisation torch reports as a no-op.
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_shrunk_ffn_equals_the_static_mask(tiny_detr):
    torch.manual_seed(4)
    keep = {name: torch.rand(block.fc1.out_features) > 0.6 for name, block in ffn_blocks(tiny_detr).items()}
    keep["encoder.0"][:] = False  # a block with nothing left
    pixels = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        with sparse_ffns(tiny_detr, {n: StaticMask(k) for n, k in keep.items()}):
            masked = tiny_detr(pixel_values=pixels)
        shrunk = shrink_ffns(tiny_detr, keep)(pixel_values=pixels)
    torch.testing.assert_close(shrunk.logits, masked.logits, **TOLERANCE)
    torch.testing.assert_close(shrunk.pred_boxes, masked.pred_boxes, **TOLERANCE)


# ---------------------------------------------------------------- the take-away gated DETR

@pytest.fixture()
def tiny_detr():
    torch.manual_seed(0)
    return build_small_detr(small_detr_config(ARCH, CATEGORIES)).eval()


@pytest.fixture()
def saved(tiny_detr, tmp_path):
    """A tiny DETR and a gate set whose masks differ per token (random gates, about half the groups open)."""
    blocks = ffn_blocks(tiny_detr)
    gates = make_gates(blocks, list(blocks), G, 0.5)
    torch.manual_seed(5)
    for gate in gates.values():
        nn.init.normal_(gate.gate.weight, std=0.5)
        nn.init.normal_(gate.gate.bias, std=0.5)
    save_gates(tmp_path / "gates.safetensors", gates, {"target": "test"})
    tiny_detr.save_pretrained(tmp_path / "model")
    return tmp_path / "model", tmp_path / "gates.safetensors"


def test_sparse_gated_detr_gives_the_masked_detections(saved):
    model_dir, gates = saved
    models = {execution: load_gated_detr(model_dir, gates, execution=execution) for execution in ("masked", "sparse")}
    assert all(isinstance(b, GatedFFN) for b in ffn_blocks(models["masked"]).values())
    assert all(isinstance(b, SparseGatedFFN) for b in ffn_blocks(models["sparse"]).values())
    pixel_values, pixel_mask = torch.randn(3, 3, 96, 128), torch.ones(3, 96, 128, dtype=torch.long)
    pixel_mask[-1, :, 64:] = 0
    with torch.no_grad():
        outputs = {e: m(pixel_values=pixel_values, pixel_mask=pixel_mask) for e, m in models.items()}
    torch.testing.assert_close(outputs["sparse"].logits, outputs["masked"].logits, **TOLERANCE)
    torch.testing.assert_close(outputs["sparse"].pred_boxes, outputs["masked"].pred_boxes, **TOLERANCE)
    processor = DetrImageProcessorPil()
    sizes = [(96, 128)] * 3
    detections = {e: processor.post_process_object_detection(out, threshold=0.0, target_sizes=sizes)
                  for e, out in outputs.items()}
    for a, b in zip(detections["masked"], detections["sparse"]):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"], **TOLERANCE)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)
    # The gates really close groups, so the sparse path skipped work (not a dense run in disguise).
    block = ffn_blocks(models["sparse"])["encoder.0"]
    opened = block.gate.open_groups(block.gate(torch.randn(100, D)))
    assert 0.1 < opened.float().mean() < 0.9


def test_execution_switches_both_ways_and_refuses_training(saved):
    model = load_gated_detr(*saved, execution="sparse")
    set_execution(model, "masked")
    assert all(isinstance(b, GatedFFN) for b in ffn_blocks(model).values())
    set_execution(model, "sparse").train()
    with pytest.raises(RuntimeError, match="sparse execution is for inference"):
        model(pixel_values=torch.randn(1, 3, 96, 128))


@pytest.mark.parametrize("bad", ["dense", "Sparse", ""])
def test_bad_execution_is_refused(saved, bad):
    with pytest.raises(ValueError, match=rf"execution = '{bad}' is not allowed: allowed values: masked, sparse"):
        load_gated_detr(*saved, execution=bad)


def detection_batches():
    """Two batches as the evaluation collates them (the second with a padded image)."""
    generator = torch.Generator().manual_seed(8)
    batches = []
    for first_id, count in ((1, 2), (3, 2)):
        pixel_mask = torch.ones(count, 96, 128, dtype=torch.long)
        pixel_mask[-1, :, 80:] = 0
        batches.append({"pixel_values": torch.randn(count, 3, 96, 128, generator=generator), "pixel_mask": pixel_mask,
                        "orig_sizes": torch.tensor([[480, 640]] * count), "image_ids": list(range(first_id,
                                                                                                   first_id + count))})
    return batches


def test_a_saved_gated_model_travels_in_one_folder(saved, tmp_path):
    model_dir, gates = saved
    evaluated = load_gated_detr(model_dir, gates)  # what mgs_evaluate runs: masked
    processor = DetrImageProcessorPil()
    expected = detect(evaluated, processor, detection_batches())
    folder = save_gated(evaluated, tmp_path / "gated", processor=processor)
    assert {"config.json", "model.safetensors", "gates.safetensors", "gated_detr.json",
            "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    assert set(gated_blocks(evaluated)) == set(ffn_blocks(evaluated))  # saving left the model gated

    masked = load_gated(folder)  # the execution it was saved with
    assert all(isinstance(b, GatedFFN) for b in ffn_blocks(masked).values())
    assert detect(masked, DetrImageProcessorPil.from_pretrained(folder), detection_batches()) == expected
    sparse = detect(load_gated(folder, execution="sparse"), processor, detection_batches())
    assert [(d["image_id"], d["category_id"]) for d in sparse] == [(d["image_id"], d["category_id"]) for d in expected]
    for a, b in zip(sparse, expected):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=2e-3)

    config = __import__("json").loads((folder / "gated_detr.json").read_text())
    assert config["format"] == "detr-sparsity-gated-detr/1" and config["execution"] == "masked"
    assert config["gates"] == {"file": "gates.safetensors", "group_size": G, "threshold": 0.5,
                               "blocks": list(ffn_blocks(evaluated))}
    assert config["dense_weights"] == {"source": str(model_dir), "revision": None}
    assert config["gates_trained"] == {"file": str(gates), "info": {"target": "test"}}
    # The folder is an ordinary transformers model directory holding the dense DETR.
    dense = DetrForObjectDetection.from_pretrained(folder)
    torch.testing.assert_close(dense.state_dict(), DetrForObjectDetection.from_pretrained(model_dir).state_dict(),
                               rtol=0, atol=0)


def test_saving_refuses_what_is_not_a_gated_model(tiny_detr, saved, tmp_path):
    with pytest.raises(ValueError, match="no gated FFN blocks"):
        save_gated(tiny_detr, tmp_path / "dense")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="holds no saved gated model"):
        save_gated(load_gated_detr(*saved), tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="is not a gated model saved by save_gated"):
        load_gated(tmp_path / "other")


# ---------------------------------------------------------------- the benchmark's rows (format, not timings)

def test_sampled_masks_are_made_of_real_token_masks():
    real = torch.rand(40, 16) > 0.8
    sampled = benchmark.sample_group_masks(real, 300, 32, torch.Generator().manual_seed(0))
    assert sampled.shape == (300, 32)
    rows = {tuple(r.tolist()) for r in real}
    assert all(tuple(half.tolist()) in rows for row in sampled for half in (row[:16], row[16:]))


def test_block_rows_report_dense_sparse_speedup_and_flops():
    blocks = []
    for i in range(2):
        fc1, fc2 = ffn_pair(seed=i)
        block = benchmark.Block(f"encoder.{i}", fc1, fc2, torch.randn(30, D))
        block.gates["0.9"] = benchmark.random_gate(D, H, G)
        block.open_groups["0.9"] = torch.rand(30, H // G) > 0.9
        block.keep["0.1"] = torch.rand(H) > 0.5
        blocks.append(block)
    rows = benchmark.block_rows("study", "encoder", blocks, ["0.9"], ["0.1"], "distillation", repeats=1, warmup=0)
    assert [(r["method"], r["setting"], r["objective"]) for r in rows] == [("mgs", "0.9", "distillation"),
                                                                           ("sibs", "0.1", None)]
    mgs, sibs = rows
    opened = sum(int(b.open_groups["0.9"].sum()) for b in blocks)
    assert mgs["induced_sparsity"] == pytest.approx(1 - opened / (2 * 30 * H // G))
    # FLOPs: dense 2 d H per token and block; MGS: the open groups' 2 d G each, plus the gate's d H / G
    assert mgs["flops_speedup"] == pytest.approx(2 * 30 * 2 * D * H / (opened * 2 * D * G + 2 * 30 * D * H // G))
    kept = sum(int(b.keep["0.1"].sum()) for b in blocks)
    assert sibs["flops_speedup"] == pytest.approx(2 * H / kept)
    for row in rows:
        assert row["dense_ms"] > 0 and row["sparse_ms"] > 0  # timings themselves are never asserted
        assert row["shape"] == "study" and row["scope"] == "encoder" and row["blocks"] == ["encoder.0", "encoder.1"]
    assert "masked_ms" in mgs


def test_without_the_kernel_the_pytorch_path_runs_and_says_so():
    import os
    import subprocess
    import sys

    script = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
              "from detr_sparsity.execution.gated_ffn import PackedFFN, sparse_ffn\n"
              "fc1, fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)\n"
              "x, m = torch.randn(5, 8), torch.rand(5, 2) > 0.5\n"
              "ref = fc2(torch.relu(fc1(x)) * m.repeat_interleave(16, -1))\n"
              "assert torch.allclose(sparse_ffn(x, m, PackedFFN(fc1, fc2, 16)), ref, atol=1e-5)\n")
    env = {**os.environ, "DETR_SPARSITY_NO_KERNEL": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "using the PyTorch dispatch path" in done.stderr


def test_detr_r50_block_rows_at_a_few_tokens_recount_their_flops_from_the_shapes():
    """DETR-R50's shapes (d 256, H 2048, 6 blocks) at 7 tokens per block, masks borrowed from two study blocks: the
    first opens every group, the second none, and they keep 3/4 and 1/4 of their neurons under SIBS. R50 block i
    borrows study block i * 2 // 6, so blocks 0-2 are all open and keep 1536 neurons, blocks 3-5 closed and keep
    512. FLOPs by hand: 2 x tokens x d x H per linear layer, two per block, the gate 2 x tokens x d x H / G."""
    study = []
    for i, (opened, kept) in enumerate(((True, 192), (False, 64))):
        fc1, fc2 = ffn_pair(seed=i)
        block = benchmark.Block(f"encoder.{i}", fc1, fc2, torch.randn(30, D))
        block.gates["0.9"] = benchmark.random_gate(D, H, G)
        block.open_groups["0.9"] = torch.full((30, H // G), opened)
        block.keep["0.1"] = torch.arange(H) < kept
        study.append(block)
    tokens, d, hidden = 7, 256, 2048
    blocks = benchmark.r50_blocks("encoder", tokens, study, ["0.9"], ["0.1"], seed=0)
    assert [b.name for b in blocks] == [f"encoder.{i}" for i in range(6)]
    assert all(tuple(b.fc1.weight.shape) == (hidden, d) and tuple(b.fc2.weight.shape) == (d, hidden)
               and tuple(b.tokens.shape) == (tokens, d) for b in blocks)
    assert [int(b.open_groups["0.9"].sum()) for b in blocks] == [tokens * hidden // G] * 3 + [0] * 3
    assert [int(b.keep["0.1"].sum()) for b in blocks] == [1536] * 3 + [512] * 3

    rows = benchmark.block_rows("detr-r50", "encoder", blocks, ["0.9"], ["0.1"], "distillation", repeats=1, warmup=0)
    mgs, sibs = rows
    linear = 2 * tokens * d * hidden  # FLOPs of one dense linear layer of one block
    dense = 6 * 2 * linear
    # MGS: blocks 0-2 compute every neuron, 3-5 none; every block pays its gate
    gated = 3 * 2 * linear + 6 * 2 * tokens * d * (hidden // G)
    assert mgs["flops_speedup"] == pytest.approx(dense / gated) == pytest.approx(32 / 17)
    assert mgs["induced_sparsity"] == pytest.approx(0.5)
    # SIBS: 1536 and 512 of 2048 neurons left, so 3/4 and 1/4 of each linear layer
    shrunk = 3 * 2 * linear * 3 / 4 + 3 * 2 * linear / 4
    assert sibs["flops_speedup"] == pytest.approx(dense / shrunk) == 2.0
    assert sibs["induced_sparsity"] == pytest.approx(0.5)
    # FLOPs per second over the measured times (the FLOPs above count 2 per multiply-accumulate)
    assert mgs["sparse_gflops"] == pytest.approx(gated / (mgs["sparse_ms"] * 1e6))
    assert sibs["sparse_gflops"] == pytest.approx(shrunk / (sibs["sparse_ms"] * 1e6))
    assert mgs["dense_gflops"] == sibs["dense_gflops"] == pytest.approx(dense / (mgs["dense_ms"] * 1e6))
    for row in rows:
        assert row["shape"] == "detr-r50" and row["tokens_per_block"] == tokens
        assert row["blocks"] == [f"encoder.{i}" for i in range(6)]
        assert row["speedup"] == row["dense_ms"] / row["sparse_ms"]
        assert row["fraction_of_theoretical"] == pytest.approx(row["speedup"] / row["flops_speedup"])
        assert row["gain"] == (row["speedup"] > 1.0)
