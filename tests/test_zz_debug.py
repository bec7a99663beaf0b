import torch
import test_cpu_fast_path as t
from test_cpu_fast_path import q4_model_dir  # noqa

def test_dbg(q4_model_dir):
    runner = t._runner(q4_model_dir, "float32")
    assert t.convert_int4_linears(runner.model, torch.float32) == 8
    print("threads", torch.get_num_threads())
    stats = {}
    def hook(name):
        def f(mod, inp, out):
            x = inp[0]
            if x.numel() > 4 * x.shape[-1]:
                return
            ref = torch.nn.functional.linear(x, mod.weight, mod.bias)
            bad = sum(not (mod.forward(x) - ref).abs().max().item() < 1e-3 for _ in range(100))
            s = stats.setdefault(name, [0, 0]); s[0] += bad; s[1] += 100
            pk = mod.packed_weight
            if bad and not stats.get("saved"):
                stats["saved"] = 1
                torch.save(dict(x=x.clone(), packed=pk.clone(), sz=mod.scales_zeros.clone(), w=mod.weight.clone(), out=mod.forward(x).clone(), xs=x.untyped_storage().nbytes(), xoff=x.storage_offset()), "/tmp/p/bad.pt")
            if bad: print(name, "bad", bad, "packed", pk.shape, pk.data_ptr() % 4096, pk.untyped_storage().nbytes(), "x ptr", x.data_ptr() % 64)
        return f
    for n, m in runner.model.named_modules():
        if isinstance(m, t.Int4Linear):
            m.register_forward_hook(hook(n))
    ids = list(range(3, 40))
    t.run_prefill_logits(runner, ids, [30, 1, 1, 1, 1])
    print(stats)
