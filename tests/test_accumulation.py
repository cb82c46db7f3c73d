"""Gradient accumulation (train.micro_batch): micro-batches of whole groups give the loss, the gradients and,
through the real loop, the weights of one batch; under DDP the gradients are all-reduced once per step."""

import subprocess
import sys

import pytest
import torch
from helpers import LAUNCH, launch, one_thread_env
from test_distributed import free_port
from toynets import TinyNet

from imm.core import mapping, objective, parameterization

STEPS = 20
# mlp: dropout 0; lr 1e-4 from step 0 moves every weight by 1.3-1.8e-3 in 20 steps, 100x the tolerance
TINY = ["debug=toy", f"train.steps={STEPS}", "tracking.enabled=false", "optim.warmup_steps=0"]
TINY += ["optim.lr_schedule=constant", "optim.lr=1e-4"]
# float summation order (micro-batch gradients summed vs one batch) through 20 AdamW steps: 1.3e-6 measured
TOLERANCE = 1e-5


def imm_objective(**kw):
    par = parameterization.get("euler_fm", schedule="fm")
    m = mapping.Mapping("eta_decrement", schedule="fm", k=12, eps=0.01, T=0.994)
    return objective.IMMObjective(par, m, M=4, a=1, b=4, **kw)


def fm_objective(**kw):
    return objective.FMObjective(parameterization.get("euler_fm", schedule="fm"), **kw)


OBJECTIVES = {"imm": imm_objective, "fm": fm_objective}
CONDITIONAL = {"label_dropout": 0.3, "num_classes": 3}


def loss_and_grads(net, obj, x, labels, micro: int | None):
    """The accumulated loss and gradients as the loop computes them: one draw, then sum of loss / n backward."""
    net.zero_grad()
    draws = obj.draw(x, labels, torch.Generator().manual_seed(5))
    size = micro or x.shape[0]
    parts = [slice(a, a + size) for a in range(0, x.shape[0], size)]
    losses = []
    for part in parts:
        loss, _ = obj.loss(net, x[part], draws[part])
        (loss / len(parts)).backward()
        losses.append(loss.detach())
    return torch.stack(losses).mean(), [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("kind", OBJECTIVES)
@pytest.mark.parametrize("micro", [4, 8, 16])
def test_micro_batches_give_the_loss_and_gradients_of_one_batch(kind, micro):
    torch.manual_seed(0)
    net = TinyNet(num_classes=3)
    x, labels = torch.randn(32, 2), torch.randint(0, 3, (32,))
    obj = OBJECTIVES[kind](rank=1, world_size=2, **CONDITIONAL)
    full_loss, full_grads = loss_and_grads(net, obj, x, labels, None)
    loss, grads = loss_and_grads(net, obj, x, labels, micro)
    assert torch.allclose(loss, full_loss, rtol=1e-6, atol=0)
    for g, g_full in zip(grads, full_grads, strict=True):
        assert torch.allclose(g, g_full, rtol=1e-5, atol=1e-7)
    # and without micro-batches, draw + loss is exactly what calling the objective computes
    called, _ = obj(net, x, labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(called.detach(), full_loss)


def test_the_draws_keep_their_order_and_are_made_for_the_global_batch():
    """IMM: t, then s for every group of the global batch, then the noise, then the label drops; this rank
    keeps its slice. The documented results depend on this order."""
    obj = imm_objective(rank=1, world_size=2, **CONDITIONAL)
    x, labels = torch.randn(8, 2), torch.randint(0, 3, (8,))
    draws = obj.draw(x, labels, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    u_t = torch.rand(4, generator=g, dtype=torch.float64)[2:]  # 2 ranks x 2 groups; rank 1 keeps groups 2, 3
    u_s = torch.rand(4, generator=g, dtype=torch.float64)[2:]
    noise = torch.randn(16, 2, generator=g)[8:] * obj.sigma_data
    drop = torch.rand(16, generator=g, dtype=torch.float64)[8:] < obj.label_dropout
    t = obj.eps + (obj.T - obj.eps) * u_t
    s = obj.eps + (t - obj.eps) * u_s
    assert torch.equal(draws.times[0], t) and torch.equal(draws.times[1], s)
    assert torch.equal(draws.times[2], obj.mapping(s, t))
    assert torch.equal(draws.noise, noise)
    assert torch.equal(draws.labels_student, torch.where(drop, torch.full_like(labels, 3), labels))
    assert torch.equal(draws.labels_target, labels)  # drop_target_labels=False: the undropped labels


def test_a_micro_batch_never_splits_a_group():
    draws = imm_objective().draw(torch.randn(16, 2), generator=torch.Generator().manual_seed(0))
    assert len(draws[4:12]) == 8 and draws[4:12].times[0].shape == (2,)
    with pytest.raises(ValueError, match="whole groups of 4"):
        draws[2:10]


def final_model(run_dir):
    return torch.load(run_dir / "checkpoints" / f"step-{STEPS:08d}.pt", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=TOLERANCE, rtol=0), key


@pytest.mark.slow
def test_micro_batches_train_the_weights_of_one_batch(tmp_path):
    one = launch(tmp_path, *TINY, f"hydra.run.dir={tmp_path / 'one'}", check=True)
    micro = launch(tmp_path, *TINY, "train.micro_batch=16", f"hydra.run.dir={tmp_path / 'micro'}", check=True)
    assert_same_weights(final_model(tmp_path / "one"), final_model(tmp_path / "micro"))
    loss = [ln.split("loss ")[1].split()[0] for p in (one, micro) for ln in p.stderr.splitlines() if "step 20/20" in ln]
    assert float(loss[1]) == pytest.approx(float(loss[0]), rel=1e-4)  # the logged loss: the mean of micro losses


def torchrun(cwd, *args, script=LAUNCH):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        + [str(script), *map(str, args)],
        cwd=cwd,
        env=one_thread_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_micro_batches_train_the_weights_of_one_batch_on_two_gloo_processes(tmp_path):
    for name, extra in (("one", []), ("micro", ["train.micro_batch=8"])):  # a share of 32: 4 micro-batches
        proc = torchrun(tmp_path, *TINY, *extra, f"hydra.run.dir={tmp_path / name}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(final_model(tmp_path / "one"), final_model(tmp_path / "micro"))


# A real 2-process gloo DDP step through the loop's micro-batching: a comm hook counts the all-reduces.
COUNT_ALL_REDUCES = """
import sys
import torch
import torch.distributed as dist
from imm.training.loop import _micro_batches

dist.init_process_group("gloo")
torch.manual_seed(0)
net = torch.nn.Linear(2, 2)
ddp = torch.nn.parallel.DistributedDataParallel(net)
calls = []

def hook(state, bucket):
    calls.append(1)
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut

ddp.register_comm_hook(None, hook)
x = torch.randn(32, 2)
for samples, sync in _micro_batches(ddp, 32, int(sys.argv[1]), ddp=sys.argv[2] == "ddp"):
    with sync:
        ddp(x[samples]).square().mean().backward()
with open(f"all_reduces_{sys.argv[2]}_rank{dist.get_rank()}.txt", "w") as f:
    f.write(str(len(calls)))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_all_reduces_once_per_step_not_per_micro_batch(tmp_path):
    script = tmp_path / "count_all_reduces.py"
    script.write_text(COUNT_ALL_REDUCES)
    counts = {}
    for how in ("ddp", "sync_every_micro_batch"):  # a share of 32 in micro-batches of 8
        proc = torchrun(tmp_path, 8, how, script=script)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts[how] = [int((tmp_path / f"all_reduces_{how}_rank{r}.txt").read_text()) for r in (0, 1)]
    assert counts == {"ddp": [1, 1], "sync_every_micro_batch": [4, 4]}
