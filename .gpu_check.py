"""nf4_read on CUDA equals nf4_read on the CPU, bit for bit (the CPU is checked against bitsandbytes in CI)."""
import itertools, math, torch
from minipissa.core import nf4_read
g = torch.Generator().manual_seed(0)
bad = 0
for (shape, dtype, bs, nested) in itertools.product([(40, 96), (33, 260), (7, 129), (4096, 4096)], [torch.float32, torch.bfloat16, torch.float16], [64, 128, 1024], [False, True]):
    n = math.prod(shape); blocks = -(-n // bs)
    data = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g)
    if nested:
        q = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g)
        nest = nf4_read.Nested(torch.rand(-(-blocks // 256), generator=g) * 0.05, torch.sort(torch.rand(256, generator=g) * 2 - 1).values, 256, torch.tensor(0.03))
        p = nf4_read.Packed4bit(data, q, bs, shape, dtype, nest)
    else:
        p = nf4_read.Packed4bit(data, torch.rand(blocks, generator=g) * 0.1, bs, shape, dtype)
    assert nf4_read.problem(p) is None
    cpu = nf4_read.dequantize(p)
    n2 = None if p.nested is None else nf4_read.Nested(*(t.cuda() if isinstance(t, torch.Tensor) else t for t in (p.nested.absmax, p.nested.code, p.nested.blocksize, p.nested.offset)))
    pc = nf4_read.Packed4bit(p.data.cuda(), p.absmax.cuda(), bs, shape, dtype, n2)
    gpu = nf4_read.dequantize(pc)
    same = torch.equal(cpu.reshape(-1).view(torch.uint8), gpu.cpu().reshape(-1).view(torch.uint8))
    bad += not same
    print(shape, dtype, bs, nested, gpu.device, "bit-equal" if same else "DIFFERENT")
print("cases differing:", bad)
