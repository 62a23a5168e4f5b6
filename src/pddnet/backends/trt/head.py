"""The fused TensorRT head: a graph rewrite onto four one-kernel AOT plugins.

After the correlation, the exported head runs two ``MeanFieldStep`` nodes, the second one's
input combination (``a4 + a2 D + a3 first``; folded: ``D + (a3/a2) first``), the logit scale,
``Softmax``, the expectation ``MatMul`` and the entropy (``LogSoftmax``, ``Mul``,
``ReduceSum``, ``Neg``). :class:`FuseHead` (``call(model) -> (model, changed)``, the input is
never modified) rewrites that into the TensorRT-only ops of
:data:`pddnet.backends.trt.plugins.HEAD_OPS`, each one Triton kernel
(:mod:`pddnet.backends.trt.kernels`) and so an AOT plugin (an engine runs without Python):

- every ``MeanFieldStep(x)`` becomes ``MinConvAffine(u, v, penalty; a, b, c)`` +
  ``GridSmooth``: ``x`` is traced back through ``Add``/``Sub``/``Mul``-by-a-scalar nodes to at
  most two tensors ``u``, ``v`` with ``x = a u + b v + c``, and that combination is formed in
  the min-convolution's load (for the second step ``u = D``, ``v = first``; the ``Add``/``Mul``
  nodes die). With one tensor, ``v = u`` and ``b = 0`` (never read);
- ``GridSmooth -> Mul(scale) -> Reshape -> Softmax -> MatMul(displacements)`` (plus the entropy
  nodes when present) becomes one ``DisplacementHead(m; capture, scale)`` with outputs
  ``(grid_disp, entropy)``, or ``DisplacementHeadProbs`` (also ``probs``) when the
  probabilities are a graph output or used elsewhere. The displacement constant must equal
  the displacement set of ``L = cbrt(rows)`` and ``q = -constant[0, 0]``; otherwise, or when
  any other node sits in the chain (a ``Cast`` of a mixed-precision graph), the softmax part
  is left as it is and only the mean-field steps are rewritten (said in :attr:`FuseHead.log`).

New nodes are in the ``ai.pddnet`` domain with ``plugin_namespace``/``plugin_version`` and
no local function (only TensorRT with the plugins registered can run the result). Dead nodes
and local functions nothing calls any more are removed. Run it after
:class:`~pddnet.graph.passes.bind_plugins.BindPlugins` (which strips the binding attributes of
unbound ``MeanFieldStep`` nodes). Torch-free and TensorRT-free.

Why four plugins and not one head plugin: an AOT plugin is exactly one kernel launch, and the
head has three grid-wide dependencies (each grid smoothing reads neighbouring control points'
min-convolutions; the second min-convolution needs whole smoothed cubes), so one plugin would
be JIT only (Python at run time). The chain moves the same bytes as a single multi-launch
plugin would (docs/tensorrt.md, "Fused head").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pddnet.graph.model import called_functions
from pddnet.spec import contract as C

HEAD_PENALTY = "pddnet/head_penalty_unused"


def displacement_table(L: int, q: float) -> np.ndarray:
    """``(L^3, 3)`` displacement set (``ops.displacement_set``, flattened) in float64."""
    d = np.linspace(-q, q, L)
    return np.stack(np.meshgrid(d, d, d, indexing="ij"), -1).reshape(-1, 3)


class _Graph:
    """Producer / consumer / constant lookups over one graph (rebuilt after each edit)."""

    def __init__(self, g: onnx.GraphProto):
        self.g = g
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.uses = Counter(x for n in g.node for x in n.input if x)
        self.outputs = {o.name for o in g.output}
        self.inits = {t.name: t for t in g.initializer}

    def const(self, name: str):
        """The value of an initializer or ``Constant`` output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant" and n.domain == "":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def scalar(self, name: str):
        v = self.const(name)
        return None if v is None or v.size != 1 else float(v.reshape(()))

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.g.node if name in n.input]


def _affine(G: _Graph, name: str, depth: int = 0):
    """``({tensor: coefficient}, constant)`` with ``name = sum coef * tensor + constant``."""
    n = G.producer.get(name)
    if n is None or n.domain != "" or depth > 8 or n.op_type not in ("Add", "Sub", "Mul"):
        return {name: 1.0}, 0.0
    a, b = n.input[0], n.input[1]
    ca, cb = G.const(a), G.const(b)
    if (ca is not None and ca.size != 1) or (cb is not None and cb.size != 1):
        return {name: 1.0}, 0.0  # a broadcast tensor constant: not an affine scalar map
    if n.op_type == "Mul":
        if (ca is None) == (cb is None):
            return {name: 1.0}, 0.0  # tensor * tensor, or a constant product
        s = float((ca if ca is not None else cb).reshape(()))
        terms, c = _affine(G, b if ca is not None else a, depth + 1)
        return {t: s * v for t, v in terms.items()}, s * c
    sign = -1.0 if n.op_type == "Sub" else 1.0
    terms, c = ({}, float(ca.reshape(()))) if ca is not None else _affine(G, a, depth + 1)
    tb, c2 = ({}, float(cb.reshape(()))) if cb is not None else _affine(G, b, depth + 1)
    out = dict(terms)
    for t, v in tb.items():
        out[t] = out.get(t, 0.0) + sign * v
    return out, c + sign * c2


def _cost_sized(G: _Graph, name: str) -> bool:
    """Whether ``name`` is certainly ``(G_i, G_j, G_k, L, L, L)``: the output of a custom op
    (``Correlation``, ``MeanFieldStep`` or a fused one), possibly through one ``Cast``; an
    ``Add`` operand of another shape would broadcast, which the kernel's load cannot."""
    n = G.producer.get(name)
    if n is not None and n.op_type == "Cast" and n.domain == "":
        n = G.producer.get(n.input[0])
    return n is not None and n.domain == C.DOMAIN


def _node(op, inputs, outputs, name, **attrs):
    n = helper.make_node(op, inputs, outputs, name=name, domain=C.DOMAIN)
    for k, v in attrs.items():  # in the given order (aot_impl may receive them positionally)
        n.attribute.append(helper.make_attribute(k, v))
    n.attribute.append(helper.make_attribute("plugin_namespace", C.PLUGIN_NAMESPACE))
    n.attribute.append(helper.make_attribute("plugin_version", C.PLUGIN_VERSION))
    return n


@dataclass
class FuseHead:
    """Rewrite the head's mean-field steps and softmax onto the fused-head plugins."""

    log: list[str] = field(default_factory=list)

    def call(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        self.log = []
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        steps = [n for n in g.node if n.domain == C.DOMAIN and n.op_type == "MeanFieldStep"]
        if not steps:
            self.log.append("no MeanFieldStep nodes: nothing to fuse")
            return out, False
        needs_penalty = False
        smooths = []
        for i, mfs in enumerate(steps):
            G = _Graph(g)
            x = mfs.input[0]
            terms, c = _affine(G, x)
            terms = {t: v for t, v in terms.items() if v != 0.0}
            if not 1 <= len(terms) <= 2 or not all(_cost_sized(G, t) for t in terms):
                terms, c = {x: 1.0}, 0.0
            (u, a), *rest = terms.items()
            v, b = rest[0] if rest else (u, 0.0)
            pen = mfs.input[1] if len(mfs.input) > 1 and mfs.input[1] else HEAD_PENALTY
            needs_penalty |= pen == HEAD_PENALTY
            mode = next((helper.get_attribute_value(at).decode() for at in mfs.attribute
                         if at.name == "mode"), "approx")
            base = mfs.name or f"MeanFieldStep_{i}"
            m = f"{mfs.output[0]}/minconv"
            mc = _node("MinConvAffine", [u, v, pen], [m], f"{base}/MinConvAffine", mode=mode,
                       coeffs=np.array([a, b, c], np.float32))
            gs = _node("GridSmooth", [m], [mfs.output[0]], f"{base}/GridSmooth")
            pos = list(g.node).index(mfs)
            g.node.remove(mfs)
            g.node.insert(pos, gs)
            g.node.insert(pos, mc)
            smooths.append(gs)
            self.log.append(f"{base}: MinConvAffine({u}, {v}; a={a:.6g}, b={b:.6g}, c={c:.6g}) "
                            "+ GridSmooth")
        if needs_penalty:
            g.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32),
                                                         HEAD_PENALTY))
        if smooths:
            self._fuse_softmax(g, smooths[-1])
        removed = _prune(g)
        if removed:
            self.log.append(f"removed {removed} nodes no longer used")
        reach = {(f.domain, f.name) for f in called_functions(out, out.graph.node)}
        keep = [f for f in out.functions if (f.domain, f.name) in reach]
        if len(keep) != len(out.functions):
            dropped = sorted({f.name for f in out.functions} - {f.name for f in keep})
            self.log.append(f"removed local functions no longer called: {dropped}")
            del out.functions[:]
            out.functions.extend(keep)
        return out, True

    __call__ = call

    def _fuse_softmax(self, g: onnx.GraphProto, gs: onnx.NodeProto) -> bool:
        G = _Graph(g)
        t = gs.output[0]

        def single(name, op):
            cons = G.consumers(name)
            if name in G.outputs or len(cons) != 1 or cons[0].op_type != op or cons[0].domain:
                return None
            return cons[0]

        mul = single(t, "Mul")
        scale = None if mul is None else G.scalar(mul.input[1] if mul.input[0] == t
                                                   else mul.input[0])
        reshape = None if scale is None else single(mul.output[0], "Reshape")
        shape = None if reshape is None else G.const(reshape.input[1])
        why = None
        if reshape is None:
            why = "the last grid smoothing is not followed by Mul(scalar) -> Reshape"
        elif shape is None or shape.size != 4 or (np.asarray(shape) <= 0).any():
            why = "the Reshape before the softmax is not to (G_i, G_j, G_k, L^3)"
        else:
            logits = reshape.output[0]
            cons = G.consumers(logits)
            soft = [n for n in cons if n.op_type == "Softmax"]
            lsm = [n for n in cons if n.op_type == "LogSoftmax"]
            if logits in G.outputs or len(soft) != 1 or len(soft) + len(lsm) != len(cons):
                why = "the logits feed something other than Softmax/LogSoftmax"
            elif any(_axis(n) not in (-1, 3) for n in soft + lsm):
                why = "the softmax is not over the last axis"
        if why:
            self.log.append(f"softmax left unfused: {why}")
            return False
        probs = soft[0].output[0]
        matmuls = [n for n in G.consumers(probs) if n.op_type == "MatMul" and n.input[0] == probs]
        table = None if len(matmuls) != 1 else G.const(matmuls[0].input[1])
        L = None if table is None or table.ndim != 2 or table.shape[1] != 3 else \
            round(table.shape[0] ** (1 / 3))
        if L is None or L ** 3 != table.shape[0]:
            self.log.append("softmax left unfused: no MatMul with an (L^3, 3) displacement table")
            return False
        if int(np.asarray(shape).reshape(-1)[3]) != L ** 3:
            self.log.append(f"softmax left unfused: the logits' last axis is not L^3 = {L ** 3}")
            return False
        q = -float(table[0, 0])
        if not np.allclose(table, displacement_table(L, q), rtol=1e-6, atol=1e-7):
            self.log.append("softmax left unfused: the MatMul constant is not the displacement "
                            f"set of L={L}, q={q:.6g}")
            return False
        dead = [gs, mul, reshape, soft[0], matmuls[0]]
        entropy = None
        if len(lsm) == 1:
            chain = _entropy_chain(G, probs, lsm[0].output[0])
            if chain is not None:
                dead += [lsm[0], *chain[:-1]]
                entropy = chain[-1].output[0]
                dead.append(chain[-1])
        other = [n for n in G.consumers(probs) if n not in dead]
        need_probs = probs in G.outputs or bool(other)
        outs = [matmuls[0].output[0], entropy or f"{gs.output[0]}/entropy_unused"]
        op = "DisplacementHeadProbs" if need_probs else "DisplacementHead"
        if need_probs:
            outs.append(probs)
        node = _node(op, [gs.input[0]], outs, gs.name.replace("GridSmooth", op),
                     capture=float(q), scale=float(scale))
        pos = list(g.node).index(gs)
        for n in dead:
            g.node.remove(n)
        g.node.insert(pos, node)
        self.log.append(f"{op}: grid smoothing, softmax (scale {scale:.6g}), expectation "
                        f"(L={L}, q={q:.6g})" + (", entropy" if entropy else "")
                        + (", probs" if need_probs else "") + " in one kernel")
        return True


def _axis(node) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)


def _entropy_chain(G: _Graph, probs: str, logp: str):
    """``[Mul(probs, logp), ReduceSum(-1), Neg]`` when that is what consumes ``logp``."""
    cons = G.consumers(logp)
    if len(cons) != 1 or cons[0].op_type != "Mul" or set(cons[0].input) != {probs, logp}:
        return None
    mul = cons[0]
    red = G.consumers(mul.output[0])
    if len(red) != 1 or red[0].op_type != "ReduceSum" or mul.output[0] in G.outputs:
        return None
    axes = G.const(red[0].input[1]) if len(red[0].input) > 1 else None
    keep = next((helper.get_attribute_value(a) for a in red[0].attribute
                 if a.name == "keepdims"), 1)
    if axes is None or list(np.asarray(axes).reshape(-1)) not in ([-1], [3]) or keep != 0:
        return None
    neg = G.consumers(red[0].output[0])
    if len(neg) != 1 or neg[0].op_type != "Neg" or red[0].output[0] in G.outputs:
        return None
    return [mul, red[0], neg[0]]


def _prune(g: onnx.GraphProto) -> int:
    """Remove nodes none of whose outputs is used or a graph output; return how many."""
    outputs = {o.name for o in g.output}
    removed = 0
    while True:
        used = {x for n in g.node for x in n.input if x} | outputs
        dead = [n for n in g.node if not any(o in used for o in n.output if o)]
        if not dead:
            return removed
        for n in dead:
            g.node.remove(n)
        removed += len(dead)


__all__ = ["FuseHead", "displacement_table", "HEAD_PENALTY"]
