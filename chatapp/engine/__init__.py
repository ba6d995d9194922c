"""The inference engine (torch). See the README's architecture section.

Importing it asks PyTorch's CPU allocator for transparent huge pages on its large (2 MiB and up) buffers
(`THP_MEM_ALLOC_ENABLE=1`, unless the environment already sets it; PyTorch reads it at its first allocation, so
it is set here, before the engine makes a tensor). A decode step streams every weight once, and with 4 KiB pages
the hardware prefetchers stop at each page boundary: on a 2-vCPU Zen 4 our bf16 one-row product read 512 MB of
weights at 20.7-23.1 GB/s on 4 KiB pages and 24.6-27.8 GB/s on huge pages, four runs of each alternating
(llama.cpp's mmap of its GGUF already gets huge pages from the page cache). Where the kernel's
transparent_hugepage setting is "never" the advice is simply not taken.
"""
import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
