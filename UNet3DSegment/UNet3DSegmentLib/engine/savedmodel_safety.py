"""Refuse TensorFlow SavedModels that could do more than compute on tensors, before TensorFlow loads them.

A SavedModel is a program: its functions run whatever TensorFlow operations they hold, including
file reads and writes (``ReadFile``, ``WriteFile``, ``SaveV2``, ``MergeV2Checkpoints``...), printing to a
file (``PrintV2``), datasets, table initialisers that read files, or an embedded XLA module. Keras' safe
mode does not cover SavedModels (``keras.layers.TFSMLayer`` runs them as they are), so
:func:`check_saved_model` reads ``saved_model.pb`` with TensorFlow's protobuf classes -- nothing is loaded
or run -- and accepts it only when

- it is a TensorFlow 2 SavedModel (an object graph: the TF2 loader restores variables itself and runs
  no graph-level initialiser; TF1 SavedModels run their init ops when loaded);
- every operation of every function in its function library, and of the top-level graph, is on
  :data:`ALLOWED_OPS` (pure tensor maths, array manipulation, neural-network kernels, variable reads,
  function calls and control flow), or calls a function of the same library;
- the functions TensorFlow writes for ``tf.train.Checkpoint`` (``saver_def``: ``_traced_save`` /
  ``_traced_restore``), which the TF2 loader never calls, use only :data:`SAVER_OPS` besides those;
  a checkpoint function that anything else calls is held to the strict list;
- every function an operation names (``f``, ``then_branch``, ``body``...) is in the library.

Anything else raises ``BadModelError`` naming the operation and the function holding it. The only way
past it is the explicit ``--trust-model`` option of the command line (never the web page).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Set

from ..base.errors import BadModelError

# Pure tensor operations: no file, network, process or device I/O; state only through variable reads.
ALLOWED_OPS = frozenset("""
Abs Acos Acosh Add AddN AddV2 All Any ApproximateEqual ArgMax ArgMin Asin Asinh Assert Atan Atan2 Atanh
AvgPool AvgPool3D BatchMatMul BatchMatMulV2 BatchMatMulV3 BatchToSpaceND BiasAdd BiasAddV1 Bitcast BitwiseAnd
BitwiseOr BitwiseXor BroadcastArgs BroadcastGradientArgs BroadcastTo Case Cast Ceil CheckNumerics
CheckNumericsV2 ClipByValue Concat ConcatOffset ConcatV2 Const Conv2D Conv2DBackpropInput Conv3D
Conv3DBackpropInput Conv3DBackpropInputV2 Cos Cosh Cross Cumprod Cumsum DepthToSpace DepthwiseConv2dNative
Diag DiagPart Digamma Div DivNoNan Einsum Elu EmptyTensorList EnsureShape Equal Erf Erfc Exp ExpandDims Expm1
Fill Floor FloorDiv FloorMod FusedBatchNorm FusedBatchNormV2 FusedBatchNormV3 Gather GatherNd GatherV2 Greater
GreaterEqual Identity IdentityN If InTopKV2 Inv Invert InvertPermutation IsFinite IsInf IsNan L2Loss LRN
LeakyRelu LeftShift Less LessEqual Lgamma LinSpace Log Log1p LogSoftmax LogicalAnd LogicalNot LogicalOr
MatMul MatrixBandPart MatrixDiag MatrixDiagPart MatrixDiagPartV3 MatrixDiagV3 MatrixSetDiag MatrixSetDiagV3
Max MaxPool MaxPool3D MaxPoolV2 Maximum Mean Min Minimum MirrorPad Mod Mul MulNoNan Neg NoOp NotEqual OneHot
OnesLike Pack Pad PadV2 PartitionedCall Placeholder PlaceholderWithDefault Pow PreventGradient Prod
RandomStandardNormal RandomUniform RandomUniformInt Range Rank ReadVariableOp RealDiv Reciprocal Relu Relu6
Reshape ResizeArea ResizeBicubic ResizeBilinear ResizeNearestNeighbor ResourceGather Reverse ReverseV2
RightShift Rint Roll Round Rsqrt ScatterNd Select SelectV2 Selu Shape ShapeN Sigmoid Sign Sin Sinh Size Slice
Snapshot Softmax Softplus Softsign SpaceToBatchND SpaceToDepth Split SplitV Sqrt Square SquaredDifference
Squeeze StatefulPartitionedCall StatelessCase StatelessIf StatelessRandomGetAlg StatelessRandomGetKeyCounter
StatelessRandomGetKeyCounterAlg StatelessRandomNormal StatelessRandomNormalV2 StatelessRandomUniform
StatelessRandomUniformInt StatelessRandomUniformIntV2 StatelessRandomUniformV2 StatelessTruncatedNormal
StatelessTruncatedNormalV2 StatelessWhile StopGradient StridedSlice Sub Sum Tan Tanh TensorListElementShape
TensorListFromTensor TensorListGetItem TensorListLength TensorListPopBack TensorListPushBack TensorListReserve
TensorListSetItem TensorListStack TensorScatterAdd TensorScatterUpdate Tile TopKV2 Transpose TruncateDiv
TruncateMod TruncatedNormal Unpack VarIsInitializedOp Where While Xdivy Xlog1py Xlogy ZerosLike
""".split())

# Only inside the checkpoint functions (``saver_def``) that the TF2 loader never calls.
SAVER_OPS = frozenset("""
AssignVariableOp DisableCopyOnRead MergeV2Checkpoints RestoreV2 SaveV2 ShardedFilename StaticRegexFullMatch
StringJoin
""".split())

# The top-level graph only: variable handles and their initialisers (TF1 compatibility, not run by TF2).
GRAPH_OPS = frozenset({"VarHandleOp", "AssignVariableOp"})


def check_saved_model(folder: Path) -> None:
    """Raise ``BadModelError`` unless every operation of the SavedModel in ``folder`` is allowed (see module)."""
    folder = Path(folder)
    saved_model = _read(folder)
    if not saved_model.meta_graphs:
        raise BadModelError(f"SavedModel {folder.name} holds no graph; export it again with model.export(folder)")
    for meta_graph in saved_model.meta_graphs:
        _check_meta_graph(meta_graph, folder.name)


def _read(folder: Path):
    from tensorflow.core.protobuf import saved_model_pb2

    path = folder / "saved_model.pb"
    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString(path.read_bytes())
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError, OSError
        raise BadModelError(
            f"SavedModel {folder.name}: saved_model.pb cannot be read ({type(error).__name__}: {error}); "
            "check the folder is complete, or export the model again"
        ) from error
    return saved_model


def _refuse(model: str, what: str) -> BadModelError:
    return BadModelError(
        f"SavedModel {model} {what}; SavedModels may hold only pure tensor operations (file, network and "
        "other side-effecting operations are refused for safety). Export the model with standard Keras layers, "
        "save it as .keras, or, only for a model from a source you trust, pass --trust-model"
    )


def _check_meta_graph(meta_graph, model: str) -> None:
    if not meta_graph.object_graph_def.nodes:
        raise _refuse(model, "is a TensorFlow 1 SavedModel (no object graph), whose initialisers run when loaded")
    library = {function.signature.name: function for function in meta_graph.graph_def.library.function}

    calls: Dict[str, Set[str]] = {}
    for name, function in library.items():
        calls[name] = set()
        for node in function.node_def:
            calls[name] |= _called(node, library, model, f"function {name}")

    saver_nodes = {_node_name(meta_graph.saver_def.save_tensor_name), _node_name(meta_graph.saver_def.restore_op_name)}
    saver_nodes.discard("")
    saver_roots: Set[str] = set()
    other_roots: Set[str] = set(meta_graph.object_graph_def.concrete_functions)
    # The loader also runs functions that object-graph nodes name directly (functions, bare concrete
    # functions, a resource's initialiser): none of those may use the checkpoint operations.
    for saved_object in meta_graph.object_graph_def.nodes:
        kind = saved_object.WhichOneof("kind")
        if kind == "function":
            other_roots.update(saved_object.function.concrete_functions)
        elif kind == "bare_concrete_function":
            other_roots.add(saved_object.bare_concrete_function.concrete_function_name)
    for node in meta_graph.graph_def.node:
        if node.op not in ALLOWED_OPS | GRAPH_OPS and node.op not in library:
            raise _refuse(model, f"uses the operation {node.op!r} (graph node {node.name})")
        called = _called(node, library, model, f"graph node {node.name}")
        (saver_roots if node.name in saver_nodes else other_roots).update(called)

    saver_only = _closure(saver_roots, calls) - _closure(other_roots, calls)
    for name, function in library.items():
        allowed = ALLOWED_OPS | SAVER_OPS if name in saver_only else ALLOWED_OPS
        for node in function.node_def:
            if node.op not in allowed and node.op not in library:
                raise _refuse(model, f"uses the operation {node.op!r} (in function {name})")


def _called(node, library: dict, model: str, where: str) -> Set[str]:
    """Library functions a node calls: its op when that names one, and every function-valued attribute."""
    names = {node.op} if node.op in library else set()
    for attribute in node.attr.values():
        names.update(_function_names(attribute))
    missing = sorted(names - set(library))
    if missing:
        raise _refuse(model, f"calls function {missing[0]!r}, which it does not contain ({where})")
    return names


def _function_names(attribute) -> Iterator[str]:
    kind = attribute.WhichOneof("value")
    if kind == "func":
        yield attribute.func.name
        for nested in attribute.func.attr.values():
            yield from _function_names(nested)
    elif kind == "list":
        for function in attribute.list.func:
            yield function.name


def _closure(roots: Iterable[str], calls: Dict[str, Set[str]]) -> Set[str]:
    seen: Set[str] = set()
    todo: List[str] = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in calls:
            continue
        seen.add(name)
        todo.extend(calls[name])
    return seen


def _node_name(tensor_name: str) -> str:
    """``"StatefulPartitionedCall_2:0"`` -> ``"StatefulPartitionedCall_2"`` (``^name`` control inputs too)."""
    return tensor_name.lstrip("^").split(":")[0]


def saved_model_ops(folder: Path) -> Dict[str, Set[str]]:
    """Every operation of the SavedModel, by function (``"<graph>"`` for top-level nodes); for diagnostics."""
    found: Dict[str, Set[str]] = defaultdict(set)
    for meta_graph in _read(Path(folder)).meta_graphs:
        found["<graph>"].update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            found[function.signature.name].update(node.op for node in function.node_def)
    return dict(found)

