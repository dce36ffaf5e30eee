#!/bin/bash
cd /work/wt/h26g
export PYTHONPATH=$PWD:$PWD/kernels HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
PY=/work/main/.venv/bin/python
echo "lock acquired $(date) load $(cat /proc/loadavg)"
$PY bench/llamacpp_compare.py --eqat-repeats 2 --repetitions 3 --json bench/results/llamacpp_compare.json
echo "compare done $(date) load $(cat /proc/loadavg)"
$PY bench/generate_speed.py --repeats 2 --new-tokens 48 --json bench/results/generate_speed.json
echo "speed done $(date) load $(cat /proc/loadavg)"
$PY bench/generate_profile.py ~/.cache/eqat/bench/smollm2-rtn-w4g64 --steps 12 --json bench/results/generate_profile_w4g64.json
$PY bench/generate_profile.py smollm2 --steps 12 --json bench/results/generate_profile_fp32.json
echo "all done $(date) load $(cat /proc/loadavg)"
