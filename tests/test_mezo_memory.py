"""MeZO at inference memory: each module computes with round(W + position·εz) built for its own forward,
the weights change only by the update, and a weight read outside its module is refused."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import dense_path
import zo_optimizer
from utils import UsageError
from zo_optimizer import ZOOptimizer

IDS = torch.tensor([[2, 100, 2000, 31, 4000, 7], [2, 8, 9, 10, 11, 12]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@torch.no_grad()
def test_each_module_computes_with_its_rounded_perturbed_weights(dtype, tiny_opt_dir):
    """At θ ± εZ the model's logits are, bit for bit, those of a copy whose weights are round(W ± εz) in
    their dtype; the weights themselves never change, and no master copy exists."""
    model = AutoModelForCausalLM.from_pretrained(tiny_opt_dir, dtype=dtype).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_opt_dir, dtype=dtype).eval()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = ZOOptimizer(model.parameters(), lr=1e-3, eps=1e-2, seed=5)
    optimizer.attach(model)
    assert optimizer.transient and not optimizer.masters
    optimizer.begin_step()
    for position in (+1, -1):
        optimizer.move_to(position)
        logits = model(input_ids=IDS).logits
        weights = {n: optimizer.effective_weight(p).to(dtype) for n, p in model.named_parameters()}
        plain.load_state_dict(weights, strict=False)  # (the tied head is the embedding)
        assert torch.equal(logits, plain(input_ids=IDS).logits)
        assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    optimizer.set_projected_grad(2.0)
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, start[n])]
    assert changed  # the update is the only write


class ParentReadsChild(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)

    def forward(self, ids):
        return F.linear(self.emb(ids), self.emb.weight)  # the embedding read again, by its parent


@torch.no_grad()
def test_a_weight_read_outside_its_module_is_refused_with_the_ways_out():
    model = ParentReadsChild()
    optimizer = ZOOptimizer(model.parameters(), lr=1e-3, names={id(model.emb.weight): "emb.weight"})
    optimizer.attach(model)
    optimizer.begin_step()
    model(torch.tensor([[1, 2]]))  # at θ: nothing to check yet
    optimizer.move_to(+1)
    with pytest.raises(
        UsageError, match=r"emb\.weight.*ParentReadsChild reads it with linear.*--zo_master_weights"
    ):
        model(torch.tensor([[1, 2]]))
    optimizer.release()
    master = ZOOptimizer(model.parameters(), lr=1e-3, master_weights=True)
    master.attach(model)
    master.begin_step()
    master.move_to(+1)
    model(torch.tensor([[1, 2]]))  # a float32 master perturbs the weights themselves: any read sees it


@pytest.mark.parametrize("gathering", [False, True], ids=["indexing", "gathering"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_large_linear_and_embedding_layers_are_perturbed_block_by_block(
    dtype, gathering, tiny_opt_dir, monkeypatch
):
    """Above dense_path.BLOCKED_ABOVE elements (here every Linear and Embedding), a layer's weight is never
    copied whole: its rows are perturbed a block at a time (blocks that do not fall on chunk boundaries of the
    noise stream), with the same z: the logits are those of a copy holding round(W ± εz). An embedding's
    rows are placed as a CPU places them (indexing the ids a block holds) and as a GPU does (gathering a row
    for every id, keeping those of the block: no wait for the device)."""
    monkeypatch.setattr(dense_path, "BLOCKED_ABOVE", 0)
    monkeypatch.setattr(dense_path, "GATHERING_DEVICES", {"cuda", "cpu"} if gathering else {"cuda"})
    monkeypatch.setattr(zo_optimizer, "CHUNK", 1000)  # blocks of 62 rows of 16, noise chunks of 1000 numbers
    model = AutoModelForCausalLM.from_pretrained(tiny_opt_dir, dtype=dtype).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_opt_dir, dtype=dtype).eval()
    optimizer = ZOOptimizer(model.parameters(), lr=1e-3, eps=1e-2, seed=5)
    optimizer.attach(model)
    own_forward = (torch.nn.Linear.forward, torch.nn.Embedding.forward)
    assert len(optimizer.dense_path.blocked) == sum(type(m).forward in own_forward for m in model.modules())
    drawn = []  # the tensors whose rows are drawn, in order
    perturbed_rows = optimizer.perturbed_rows
    monkeypatch.setattr(optimizer, "perturbed_rows", lambda i, *a: drawn.append(i) or perturbed_rows(i, *a))
    embedding = optimizer.index[id(model.get_input_embeddings().weight)]
    optimizer.begin_step()
    # −1 after +1 on the same ids reads its embedding rows from +1's draw; on other ids it draws them.
    for position, ids in ((+1, IDS), (-1, IDS), (-1, IDS.flip(1))):
        drawn.clear()
        optimizer.move_to(position)
        logits = model(input_ids=ids).logits
        weights = {n: optimizer.effective_weight(p).to(dtype) for n, p in model.named_parameters()}
        plain.load_state_dict(weights, strict=False)
        tolerance = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(logits, plain(input_ids=ids).logits, rtol=tolerance, atol=tolerance)
        lookups_drawn = position == 1 or ids is not IDS
        assert drawn.count(embedding) == 1 + lookups_drawn  # the (tied) LM head's draw, and the lookups'
    optimizer.release()
    assert all("forward" not in m.__dict__ for m in model.modules())  # the layers' own forwards again


def test_a_gpu_draws_dense_noise_in_chunks_that_grow_with_the_model():
    """A CPU streams 2²⁰ numbers a chunk; a GPU, for which every chunk costs ~13 launches a step, 1/512 of
    the trained numbers, a power of two from 2²⁰ to 2²⁴."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert zo_optimizer.noise_chunk(13_000_000_000, cpu) == 1 << 20
    assert zo_optimizer.noise_chunk(125_000_000, gpu) == 1 << 20  # OPT-125m: temporaries as on a CPU
    assert zo_optimizer.noise_chunk(1_300_000_000, gpu) == 1 << 21  # OPT-1.3b
    assert zo_optimizer.noise_chunk(13_000_000_000, gpu) == 1 << 24  # OPT-13B: 1.3K chunks a pass, not 12.7K
    assert zo_optimizer.noise_chunk(66_000_000_000, gpu) == 1 << 24


def part_losses(model, ids, parts):
    """Each part's mean next-token loss, from one forward of the ids `parts` times."""
    logits = model(input_ids=ids.repeat(parts, 1)).logits.float()
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids.repeat(parts, 1)[:, 1:], reduction="none")
    return losses.view(parts, -1).mean(1).tolist()


@pytest.mark.parametrize("pair", [False, True])
@torch.no_grad()
def test_a_cpu_takes_the_same_steps_in_any_chunks_of_noise(pair, tiny_opt_dir, monkeypatch):
    """On a CPU a chunk size of a multiple of 16 changes how the noise is drawn, not what: MeZO's losses and
    bf16 weights (updates rounded stochastically, lr 1e-6) are bit for bit those of 2²⁰ with chunks of 64
    numbers: the forwards (two, or with --zo_batched_pair one for two directions), the update (which packs
    tensors of one chunk into batches of up to a chunk: the whole model in one at 2²⁰), the blocks of rows
    of a large Linear or Embedding."""
    monkeypatch.setattr(dense_path, "BLOCKED_ABOVE", 0)  # every Linear and Embedding by blocks of rows
    start = AutoModelForCausalLM.from_pretrained(tiny_opt_dir, dtype=torch.bfloat16).state_dict()
    runs = []
    for chunk in (1 << 20, 64):
        model = AutoModelForCausalLM.from_pretrained(tiny_opt_dir, dtype=torch.bfloat16).eval()
        optimizer = ZOOptimizer(model.parameters(), lr=1e-6, seed=5, batched_pair=pair, queries=1 + pair)
        optimizer.chunk = chunk
        optimizer.attach(model)
        batches = optimizer._batches(optimizer.tensors)
        assert all(len(b) == 1 or sum(p.numel() for _, p in b) <= chunk for b in batches)
        assert sorted(i for b in batches for i, _ in b) == list(range(len(optimizer.tensors)))
        assert len(batches) < len(optimizer.tensors)  # (packed: at 64 numbers, the norms and biases)
        losses = []
        for _ in range(3):
            optimizer.begin_step()
            if pair:  # θ+εZ₁, θ−εZ₁, θ+εZ₂, θ−εZ₂ in one forward
                optimizer.move_to(zo_optimizer.PAIR)
                parts = part_losses(model, IDS, 4)
            else:
                parts = []
                for position in (+1, -1):
                    optimizer.move_to(position)
                    parts += part_losses(model, IDS, 1)
            gs = [(parts[k] - parts[k + 1]) / (2 * optimizer.eps) for k in range(0, len(parts), 2)]
            optimizer.set_projected_grad(gs if pair else gs[0])
            optimizer.step()
            losses += parts
        runs.append((losses, {n: p.detach().clone() for n, p in model.state_dict().items()}))
    (losses, weights), (chunked_losses, chunked_weights) = runs
    assert losses == chunked_losses
    assert all(torch.equal(weights[n], chunked_weights[n]) for n in weights)
    assert any(not torch.equal(weights[n], start[n]) for n in start)  # the updates were rounded into them


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_on_cuda_every_read_of_chunked_noise_draws_the_same_numbers(dtype, tiny_opt_dir, monkeypatch):
    """A GPU's draws depend on the chunks: with chunks of 64 numbers, the modules' forwards (whole, and by
    blocks of rows) compute with the effective weights, bit for bit."""
    for blocked_above in (1 << 22, 0):
        monkeypatch.setattr(dense_path, "BLOCKED_ABOVE", blocked_above)
        model = AutoModelForCausalLM.from_pretrained(tiny_opt_dir, dtype=dtype).cuda().eval()
        plain = AutoModelForCausalLM.from_pretrained(tiny_opt_dir, dtype=dtype).cuda().eval()
        optimizer = ZOOptimizer(model.parameters(), lr=1e-3, eps=1e-2, seed=5)
        assert optimizer.chunk == 1 << 20
        optimizer.chunk = 64
        optimizer.attach(model)
        optimizer.begin_step()
        for position in (+1, -1):
            optimizer.move_to(position)
            logits = model(input_ids=IDS.cuda()).logits
            weights = {n: optimizer.effective_weight(p).to(dtype) for n, p in model.named_parameters()}
            plain.load_state_dict(weights, strict=False)  # (the tied head is the embedding)
            assert torch.equal(logits, plain(input_ids=IDS.cuda()).logits)
