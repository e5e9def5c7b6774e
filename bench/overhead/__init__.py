"""What olla costs beyond a bare proxy: bench/README.md describes it, bench/results/overhead.md has the figures."""
