#!/usr/bin/env bash
# Build a TensorRT engine from a yolocomp / Ultralytics ONNX with trtexec, and write <engine>.json metadata beside it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: build_engine.sh --onnx MODEL.onnx [options]

Builds MODEL.engine with trtexec (JetPack: /usr/src/tensorrt/bin/trtexec) and writes MODEL.engine.json
(names, imgsz, precision, TensorRT version) that deploy/jetson/infer.py and bench.py read.

Options:
  --onnx FILE           input ONNX (float, or INT8 Q/DQ from `yolocomp ptq` / `yolocomp qat`)   [required]
  --engine FILE         output engine (default: ONNX path with .engine; an existing file is never overwritten)
  --precision P         auto | fp32 | fp16 | int8 (default auto: int8 for a Q/DQ ONNX, else fp16)
                          int8 + Q/DQ ONNX : explicit quantization (TensorRT 8.6 .. 11)
                          int8 + float ONNX: implicit INT8, TensorRT <= 10 only, needs --calib CACHE
                                             (trtexec cannot calibrate from images; make the cache with
                                             `yolocomp export --format engine --precision int8 --calibration-cache`)
  --calib FILE          TensorRT calibration cache for implicit INT8
  --dla N               build for DLA core N (Jetson Xavier/Orin; fp16 or int8; GPU fallback on)
  --batch N             batch size (default 1). N > 1 needs an ONNX exported with dynamic=True
  --imgsz N             image size for dynamic ONNX shapes (default 640)
  --input-name NAME     ONNX input name for shape options (default images)
  --timing-cache FILE   reuse / update a timing cache (faster rebuilds)
  --workspace MIB       builder workspace in MiB (default 4096)
  --trtexec PATH        trtexec binary (default: $TRTEXEC, trtexec on PATH, or /usr/src/tensorrt/bin/trtexec)
  --trt-version X.Y.Z   assume this TensorRT version instead of asking trtexec (for --dry-run without TensorRT)
  --dry-run             print the trtexec command and exit
  -h, --help            show this help

TensorRT 11 networks are strongly typed: no --fp16/--int8 flags exist there. Build INT8 from a Q/DQ ONNX, FP16 from
an ONNX converted with ModelOpt AutoCast; DLA is not available in TensorRT 11.
EOF
}

die() { echo "build_engine.sh: $*" >&2; exit 2; }

ONNX="" ENGINE="" PRECISION="auto" CALIB="" DLA="" BATCH=1 IMGSZ=640 INPUT="images" TIMING="" WORKSPACE=4096
TRTEXEC_BIN="${TRTEXEC:-}" TRT_VERSION="" DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --onnx) ONNX="${2:?--onnx needs a file}"; shift 2 ;;
    --engine) ENGINE="${2:?--engine needs a file}"; shift 2 ;;
    --precision) PRECISION="${2:?--precision needs a value}"; shift 2 ;;
    --calib) CALIB="${2:?--calib needs a file}"; shift 2 ;;
    --dla) DLA="${2:?--dla needs a core number}"; shift 2 ;;
    --batch) BATCH="${2:?--batch needs a number}"; shift 2 ;;
    --imgsz) IMGSZ="${2:?--imgsz needs a number}"; shift 2 ;;
    --input-name) INPUT="${2:?--input-name needs a name}"; shift 2 ;;
    --timing-cache) TIMING="${2:?--timing-cache needs a file}"; shift 2 ;;
    --workspace) WORKSPACE="${2:?--workspace needs MiB}"; shift 2 ;;
    --trtexec) TRTEXEC_BIN="${2:?--trtexec needs a path}"; shift 2 ;;
    --trt-version) TRT_VERSION="${2:?--trt-version needs X.Y.Z}"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ -n "$ONNX" ]] || die "--onnx is required (see --help)"
[[ -f "$ONNX" ]] || die "ONNX not found: $ONNX"
[[ -n "$ENGINE" ]] || ENGINE="${ONNX%.onnx}.engine"
[[ -e "$ENGINE" ]] && die "$ENGINE already exists; pass another --engine (nothing is overwritten)"
[[ "$PRECISION" =~ ^(auto|fp32|fp16|int8)$ ]] || die "--precision $PRECISION is not one of auto, fp32, fp16, int8"
[[ "$BATCH" =~ ^[1-9][0-9]*$ ]] || die "--batch $BATCH must be a positive integer"
[[ "$IMGSZ" =~ ^[1-9][0-9]*$ ]] || die "--imgsz $IMGSZ must be a positive integer"
[[ "$WORKSPACE" =~ ^[1-9][0-9]*$ ]] || die "--workspace $WORKSPACE must be a positive number of MiB"
[[ -z "$DLA" || "$DLA" =~ ^[0-9]+$ ]] || die "--dla $DLA must be a core number (0 or 1)"

# Q/DQ node type names are stored as plain strings in the ONNX protobuf: grep finds them without Python.
QDQ=0
if grep -aq -e QuantizeLinear -e DequantizeLinear "$ONNX"; then QDQ=1; fi

if [[ -z "$TRT_VERSION" ]]; then
  if [[ -z "$TRTEXEC_BIN" ]]; then
    TRTEXEC_BIN="$(command -v trtexec || true)"
    [[ -z "$TRTEXEC_BIN" && -x /usr/src/tensorrt/bin/trtexec ]] && TRTEXEC_BIN=/usr/src/tensorrt/bin/trtexec
  fi
  [[ -n "$TRTEXEC_BIN" ]] || die "trtexec not found: on JetPack it is /usr/src/tensorrt/bin/trtexec (apt install tensorrt), or pass --trtexec"
  # trtexec prints e.g. "[TensorRT v8601]" or "[TensorRT v100300]" at start-up
  CODE="$("$TRTEXEC_BIN" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n1 | tr -dc '0-9' || true)"
  [[ -n "$CODE" ]] || die "cannot read the TensorRT version from $TRTEXEC_BIN; pass --trt-version"
  if (( CODE >= 100000 )); then TRT_MAJOR=$(( CODE / 10000 )); else TRT_MAJOR=$(( CODE / 1000 )); fi
  TRT_VERSION="$TRT_MAJOR.$(( CODE % (TRT_MAJOR >= 10 ? 10000 : 1000) / 100 )).$(( CODE % 100 ))"
else
  TRT_MAJOR="${TRT_VERSION%%.*}"
  [[ "$TRT_MAJOR" =~ ^[0-9]+$ ]] || die "--trt-version $TRT_VERSION should look like 10.3.0"
fi
[[ -n "$TRTEXEC_BIN" ]] || TRTEXEC_BIN=trtexec

if [[ "$PRECISION" == auto ]]; then
  if (( QDQ )); then PRECISION=int8; elif (( TRT_MAJOR >= 11 )); then PRECISION=fp32; else PRECISION=fp16; fi
fi
if (( QDQ )) && [[ "$PRECISION" != int8 ]]; then
  die "$ONNX is quantized (Q/DQ) and always builds INT8; use --precision int8 or auto, or export a float ONNX"
fi

ARGS=(--onnx="$ONNX" --saveEngine="$ENGINE" --memPoolSize=workspace:"$WORKSPACE")
if (( TRT_MAJOR >= 11 )); then
  # strongly typed: precision comes from the graph
  if [[ "$PRECISION" == int8 ]] && (( ! QDQ )); then
    die "TensorRT $TRT_VERSION builds INT8 only from Q/DQ ONNX; quantize with \`yolocomp ptq\` or \`yolocomp qat\`"
  fi
  if [[ "$PRECISION" == fp16 ]]; then
    die "TensorRT $TRT_VERSION has no --fp16; convert first: python -m modelopt.onnx.autocast --onnx_path $ONNX"
  fi
  [[ -z "$DLA" ]] || die "TensorRT $TRT_VERSION does not support DLA; use the TensorRT 8.x/10.x that ships with JetPack"
else
  case "$PRECISION" in
    fp16) ARGS+=(--fp16) ;;
    int8)
      ARGS+=(--int8 --fp16)  # layers outside Q/DQ pairs may run in FP16
      if (( ! QDQ )); then
        [[ -n "$CALIB" ]] || die "INT8 from a float ONNX needs --calib CACHE (trtexec would use dummy scales); or build from a Q/DQ ONNX"
        [[ -f "$CALIB" ]] || die "calibration cache not found: $CALIB"
        ARGS+=(--calib="$CALIB")
      fi ;;
  esac
fi
[[ -z "$CALIB" || ( "$PRECISION" == int8 && $QDQ == 0 ) ]] || die "--calib is only used for INT8 from a float ONNX"
if [[ -n "$DLA" ]]; then
  [[ "$PRECISION" != fp32 ]] || die "DLA runs only fp16 or int8 layers; pass --precision fp16 or int8"
  ARGS+=(--useDLACore="$DLA" --allowGPUFallback)
fi
if (( BATCH > 1 )); then
  SHAPE_MIN="$INPUT:1x3x${IMGSZ}x${IMGSZ}" SHAPE_MAX="$INPUT:${BATCH}x3x${IMGSZ}x${IMGSZ}"
  ARGS+=(--minShapes="$SHAPE_MIN" --optShapes="$SHAPE_MAX" --maxShapes="$SHAPE_MAX")
fi
[[ -z "$TIMING" ]] || ARGS+=(--timingCacheFile="$TIMING")

echo "$TRTEXEC_BIN ${ARGS[*]}"
(( DRY )) && exit 0

"$TRTEXEC_BIN" "${ARGS[@]}"

# Metadata beside the engine: names/stride/imgsz from the ONNX's Ultralytics metadata when the onnx package is there.
python3 - "$ONNX" "$ENGINE" "$PRECISION" "$BATCH" "$TRT_VERSION" "${DLA:-}" "$IMGSZ" <<'PY'
import ast, json, sys, time
onnx_path, engine, precision, batch, trt_version, dla, imgsz = sys.argv[1:]
meta = {}
try:
    import onnx
    meta = {p.key: p.value for p in onnx.load(onnx_path, load_external_data=False).metadata_props}
except Exception as e:  # no onnx package: still write what we know
    print(f"note: ONNX metadata not read ({type(e).__name__}); class names will be numbers", file=sys.stderr)
names = ast.literal_eval(meta.get("names", "{}"))
size = ast.literal_eval(meta["imgsz"]) if "imgsz" in meta else [int(imgsz)] * 2
json.dump({
    "task": meta.get("task", "detect"), "names": {int(k): v for k, v in dict(names).items()},
    "imgsz": list(size) if isinstance(size, (list, tuple)) else [size, size], "stride": int(meta.get("stride", 32)),
    "precision": precision, "batch": int(batch), "dla_core": int(dla) if dla else None, "tensorrt": trt_version,
    "source_onnx": onnx_path, "builder": "trtexec (deploy/jetson/build_engine.sh)",
    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
}, open(engine + ".json", "w"), indent=2)
print(f"wrote {engine} and {engine}.json")
PY
