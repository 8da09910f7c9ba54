python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; tar -C /tmp/site -xJf .out/tfx/site.tar.xz; export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; mkdir -p $OUT/r; trap 'cd $OUT && tar czf r.tgz r' EXIT
git log --oneline | head -1 > $OUT/r/gpu-tests.txt
timeout 150 python3 -m pytest -q -m gpu tests/test_dp_kernels.py tests/test_gpu.py -p no:cacheprovider >> $OUT/r/gpu-tests.txt 2>&1
grep -E "passed|failed|FAILED" $OUT/r/gpu-tests.txt | head -20
timeout 90 python3 benchmarks/bench_e2e.py --sizes 7b --frames 32 128 --new-tokens 256 --repeats 3 --contenders full dycoke --out $OUT/r/e2e-h200-gathered.json 2>&1 | tail -6
timeout 210 python3 benchmarks/bench_batch.py --size 7b --frames 32 --new-tokens 64 --memory-budget-gib 30 --videos 2 --questions-per-video 256 --methods full dycoke dycoke:gate_threshold=1.0 dycoke-evict --modes --out $OUT/r/batch-budget-7b-h200-gathered.json 2>&1 | tee $OUT/r/batch-log.txt | grep -v "^  batch" | tail -6
DYCOKE_DP_GATHER=0 timeout 110 python3 benchmarks/bench_batch.py --size 7b --frames 32 --new-tokens 64 --memory-budget-gib 30 --videos 2 --questions-per-video 256 --methods full dycoke:gate_threshold=1.0 --modes --out $OUT/r/batch-budget-7b-h200-masked.json 2>&1 | tee $OUT/r/batch-log2.txt | grep -v "^  batch" | tail -3
