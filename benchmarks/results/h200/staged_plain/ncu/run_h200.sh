export PYTHONPATH=$PWD
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
timeout 200 $NCU --clock-control none --kernel-name regex:'gemv_kernel|staged_kernel' --launch-skip 0 --launch-count 9 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
  python3 w/ncu_down.py > $OUT/ncu_down.txt 2>&1
echo rc=$?
grep -E "gemv_kernel|staged_kernel|Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issued Warp Per Scheduler|No Eligible|Warp Cycles Per Issued|Theoretical Occupancy|Block Limit" $OUT/ncu_down.txt | head -120
