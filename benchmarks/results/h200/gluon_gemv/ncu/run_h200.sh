#!/bin/bash
# ncu of the shipped int4 gate/up (case 0) and the Gluon (2, 2, 4, 512) one (case 8)
OUT=$1; mkdir -p $OUT/ncu
for c in 0 8; do
  ncu --clock-control none --kernel-name regex:'gemv_kernel|gluon_gated_kernel' --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats \
    -o $OUT/ncu/case$c python3 benchmarks/experiments/gluon_gemv_probe.py --eager $c > $OUT/ncu/case$c.log 2>&1
  ncu -i $OUT/ncu/case$c.ncu-rep --page details > $OUT/ncu/case${c}_details.txt 2>&1
  ncu -i $OUT/ncu/case$c.ncu-rep --page raw --csv > $OUT/ncu/case${c}_raw.csv 2>&1
  rm -f $OUT/ncu/case$c.ncu-rep
done
grep -h -E "Duration|DRAM Throughput|Issue Slots Busy|Issued Ipc|Registers Per|Achieved Occupancy|No Eligible|Warp Cycles Per Issued|One or More" $OUT/ncu/case*_details.txt
