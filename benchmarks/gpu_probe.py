"""One-off GPU probe: timings of the decomposition primitives (eigh/svd/QR) on the device machine."""

import time

import torch


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best.append(time.perf_counter() - t)
    return sorted(best)[len(best) // 2]


def main() -> None:
    import peft
    import transformers

    print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
    print(torch.cuda.get_device_name())
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(4096, 11008, device=dev, generator=g, dtype=torch.float32)
    w4 = torch.randn(4, 4096, 4096, device=dev, generator=g, dtype=torch.float32)
    wd = w.double()
    gram = wd @ wd.mT
    print("gram64 4096x11008", timed(lambda: wd @ wd.mT))
    print("eigh64 4096", timed(lambda: torch.linalg.eigh(gram)))
    print("eigvalsh64 4096", timed(lambda: torch.linalg.eigvalsh(gram)))
    g32 = gram.float()
    print("eigh32 4096", timed(lambda: torch.linalg.eigh(g32)))
    g4 = w4.double() @ w4.double().mT
    print("eigh64 batch4 4096", timed(lambda: torch.linalg.eigh(g4)))
    streams = [torch.cuda.Stream() for _ in range(4)]

    def on_streams():
        cur = torch.cuda.current_stream()
        outs = []
        for i, s in enumerate(streams):
            s.wait_stream(cur)
            with torch.cuda.stream(s):
                outs.append(torch.linalg.eigh(g4[i]))
        for s in streams:
            cur.wait_stream(s)
        return outs

    print("eigh64 4 streams 4096", timed(on_streams))
    print("svd32 4096x11008", timed(lambda: torch.linalg.svd(w, full_matrices=False), reps=1))
    print(
        "svd32 gesvdj? 4096x4096", timed(lambda: torch.linalg.svd(w4[0], full_matrices=False, driver="gesvdj"), reps=1)
    )
    # randomized building blocks: 32 matrices 4096x11008 bf16 -> fp32, k = 80
    wb = torch.randn(8, 11008, 4096, device=dev, generator=g).bfloat16()
    om = torch.randn(8, 4096, 80, device=dev, generator=g)

    def rand(tf32: bool):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        m = wb.float()
        y = m @ om
        for _ in range(4):
            y = torch.linalg.qr(y).Q
            y = m @ (m.mT @ y)
        q = torch.linalg.qr(y).Q
        b = q.mT @ m
        return torch.linalg.svd(b, full_matrices=False)

    def chol(y):
        gg = (y.mT @ y).double()
        ll = torch.linalg.cholesky(gg)
        return torch.linalg.solve_triangular(ll, y.double().mT, upper=False).mT.float()

    def rand_chol(tf32: bool):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        m = wb.float()
        y = m @ om
        for _ in range(4):
            y = chol(y)
            y = m @ chol(m.mT @ y)
        q = chol(y)
        b = q.mT @ m
        gb = (b @ b.mT).double()
        return torch.linalg.eigh(gb)

    print("rand qr fp32 x8", timed(lambda: rand(False)))
    print("rand qr tf32 x8", timed(lambda: rand(True)))
    print("rand chol fp32 x8", timed(lambda: rand_chol(False)))
    print("rand chol tf32 x8", timed(lambda: rand_chol(True)))
    torch.backends.cuda.matmul.allow_tf32 = False
    yy = torch.randn(8, 11008, 80, device=dev)
    print("qr 8x11008x80", timed(lambda: torch.linalg.qr(yy)))
    print("cholqr 8x11008x80", timed(lambda: chol(yy)))
    bb = torch.randn(8, 80, 4096, device=dev)
    print("svd 8x80x4096", timed(lambda: torch.linalg.svd(bb, full_matrices=False)))
    print("eigh64 8x80x80", timed(lambda: torch.linalg.eigh((bb @ bb.mT).double())))


if __name__ == "__main__":
    main()
