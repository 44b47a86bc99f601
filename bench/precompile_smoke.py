import sys, time, torch, tempfile, logging
logging.basicConfig(level=logging.WARNING)
from pathlib import Path
from diffusers.models.resnet import ResnetBlock2D
from daemon.generate import precompile
d = Path(tempfile.mkdtemp())
torch.manual_seed(0)
layer = ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=128, groups=32).cuda().half().eval()
x = torch.randn(2, 64, 32, 32, device="cuda", dtype=torch.half); t = torch.randn(2, 128, device="cuda", dtype=torch.half)
with torch.inference_mode():
    want = layer._call_impl(x, t)
    g = precompile.LayerGraphs(d, "default"); g.install([layer]); t0=time.perf_counter(); got = layer(x, t)
    print("first", g.stats.as_dict(), time.perf_counter()-t0, float((got-want).abs().max()))
    g2 = precompile.LayerGraphs(d, "default"); g2.install([layer]); t0=time.perf_counter(); got = layer(x, t)
    print("second", g2.stats.as_dict(), time.perf_counter()-t0, float((got-want).abs().max()))
ok = g.stats.compiled == 1 and g2.stats.loaded == 1 and g2.stats.compiled == 0
print("SMOKE", "OK" if ok else "FAIL"); sys.exit(0 if ok else 1)
