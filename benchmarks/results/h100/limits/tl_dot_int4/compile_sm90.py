"""Compile kernel.py for sm_90 without a GPU (qwen2.5-7b's gate/up shape) and count the SASS
instructions of its K loop: python compile_sm90.py BLOCK_N [WARPS STAGES NPAD]."""
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel import mma4_kernel  # noqa: E402


def loop_histogram(sass):
    """Instructions between the largest backward branch and its target."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           (re.match(r'\s*/\*([0-9a-f]{4,})\*/\s+(.*?);', line) for line in sass.splitlines())
           if m]
    loops = [(int(t.group(1), 16), addr) for addr, text in ins if 'BRA' in text
             for t in [re.search(r'0x([0-9a-f]+)', text)] if t and int(t.group(1), 16) < addr]
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    ops = [re.sub(r'^@!?U?P\w+\s+', '', text).split()[0].split('.')[0]
           for addr, text in ins if lo <= addr <= hi]
    return len(ops), collections.Counter(ops).most_common(12)


def main():
    given = [int(v) for v in sys.argv[1:]]
    block_n, warps, stages, npad = given + [4, 1, 16][len(given) - 1:]
    names = list(mma4_kernel.arg_names)
    ptrs = {'W': '*i32', 'S': '*bf16', 'Z': '*bf16', 'X': '*bf16', 'Y': '*bf16'}
    const = dict(K=3584, GROUP=128, BLOCK_N=block_n, STAGES=stages, NPAD=npad)
    sig = {n: 'constexpr' if n in const else ptrs.get(n, 'i32') for n in names}
    hints = [names.index(n) for n in [*ptrs, 'stride_w', 'stride_s', 'N']]
    src = ASTSource(mma4_kernel, sig,
                    constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(i,): [['tt.divisibility', 16]] for i in hints})
    kernel = triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': warps})
    tools = os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin')
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(kernel.asm['cubin'])
        f.flush()
        sass = subprocess.run([os.path.join(tools, 'cuobjdump'), '-sass', f.name],
                              capture_output=True, text=True, check=True).stdout
    count, ops = loop_histogram(sass)
    per_thread = block_n * 128 // (32 * warps)
    print(f'BLOCK_N {block_n}, {warps} warps: {count} instructions a K step for {per_thread} '
          f'weights a thread ({count / per_thread:.2f} a weight), shared memory '
          f'{kernel.metadata.shared} B, dot lowered to '
          f"{'wgmma' if 'warp_group_dot' in kernel.asm['ttgir'] else 'mma'}")
    print('  ' + ' '.join(f'{op}:{n}' for op, n in ops))


if __name__ == '__main__':
    main()
