"""Run the graft CLI with cuDNN attention left out of the fixed-shape steps (diagnosis only)."""
import sys
import graft.modeling as m, graft.engine as e, graft.speculative as s
orig = m.attention_backends
def no_cudnn(device, static):
    return orig(device, False)
m.attention_backends = e.attention_backends = s.attention_backends = no_cudnn
from graft.cli import main
sys.argv = ["graft"] + sys.argv[1:]
main()
