"""Speed benchmark of our models against torchvision's mobile peers, in ONE process.

``python tools/benchmark.py task=det|seg [model.*=...] [device=cpu|cuda] [threads=N] [batch_size=B]
[variants=true]`` (config ``conf/benchmark.yaml``).

Every model gets the same inputs and settings (device, threads, precision, optimizer):

- det: SSDLite-MobileNetV2 (``conf/model/ssdlite_mnv2.yaml`` + overrides) vs torchvision
  ``ssdlite320_mobilenet_v3_large``; seg: Mobile DeepLabv3 (``conf/model/deeplabv3_mnv2.yaml``) vs
  ``deeplabv3_mobilenet_v3_large`` and ``lraspp_mobilenet_v3_large``. All random init
  (``weights=None, weights_backbone=None``); det uses ``num_classes`` object classes + background on
  both sides.
- train step: forward + loss + backward + optimizer step (AdamW) on realistic targets (det: 1..
  ``boxes_per_image`` random boxes per image, COCO averages ~7; seg: random masks with 255 borders).
- eval: det forward + decode + NMS (ours: ``SSDLite.postprocess``; torchvision: its eval forward,
  which includes its transform and post-processing); seg forward + upsample + argmax. Ours runs
  the network our evaluation and prediction run: ``TaskModule.inference_model()``, BatchNorm folded
  into the convs (``backbone.fuse``); the peers run as torchvision ships them.
- batch-1 latency of the whole eval call (median and p90), forward-only img/s and its efficiency
  (MAdds x 2 / time / the machine's torch.mm 2048^2 GFLOP/s on the same threads).
- peak memory of one train step: CPU peak RSS growth (``VmHWM``, reset through
  ``/proc/self/clear_refs``) or CUDA max allocated.

Timings are interleaved (ours, peer, ours, peer, ... ``repeats`` rounds) and medians taken, so
machine noise hits every model alike. Ratios ours / peer are printed with the project's targets.

Also: ONNX Runtime batch-1 latency of our exported model (``backbone.export``, when onnxruntime is
importable), COCO scoring time pycocotools vs faster-coco-eval (det), the train loader alone
(``loader=true``), ``precision=bf16-mixed`` / ``compile=true`` / ``model.memory_format=...`` /
``runtime.cpu_allocator=default`` to compare levers, torch.profiler's top ops of every model's train
step and eval call (``profile=true``), and a README table of variants (``variants=true``).
"""
from backbone.benchmark.run import benchmark

__all__ = ["benchmark"]
