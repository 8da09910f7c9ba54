python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; tar -C /tmp/site -xJf .out/tfx/site.tar.xz; export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; mkdir -p $OUT/r; trap 'cd $OUT && tar czf r.tgz r' EXIT
nvidia-smi --query-gpu=name,memory.used --format=csv
git log --oneline | head -1 > $OUT/r/gpu-tests.txt
timeout 420 python3 -m pytest -q -m gpu tests/test_pinned_frames.py tests/test_frame_stream.py tests/test_gpu.py tests/test_continuation_attention.py tests/test_dp_kernels.py tests/test_fused_step.py tests/test_prefill_attention.py -p no:cacheprovider >> $OUT/r/gpu-tests.txt 2>&1
grep -E "passed|failed|FAILED|Error" $OUT/r/gpu-tests.txt | head -30
