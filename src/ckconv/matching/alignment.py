"""Step 6 of matching: align what is left by module order and shape (caffe-style ``conv1_1``/``fc6`` renames).

Leftover keys are grouped by module (``conv1_1.weight`` + ``conv1_1.bias``), source groups in file order, target
groups in state_dict order. An order-preserving alignment maximises the tensors paired (weighted longest common
subsequence). A pair of groups is accepted only when *every* optimal alignment contains it -- the alignment is
unambiguous there; other candidates are reported, never guessed.

Inside a pair of groups tensors pair by leaf name (``weight`` with ``weight``), or by shape when the leaf names
differ and every shape in the group is distinct. A tensor may be reshaped only when it pairs by name, element
counts agree, the leading (output) dimension agrees and the ranks differ (a Linear stored as a 1x1 or 7x7 conv).
"""

from __future__ import annotations

from math import prod

MAX_CELLS = 500_000  # groups x groups; beyond this the alignment is skipped with a note
EXACT, RESHAPE = 2, 1


def reshape_ok(src_shape, tgt_shape) -> bool:
    """A Linear <-> conv weight: same element count, same output dimension, different rank."""
    src_shape, tgt_shape = tuple(src_shape), tuple(tgt_shape)
    if src_shape == tgt_shape or len(src_shape) == len(tgt_shape) or prod(src_shape) != prod(tgt_shape):
        return False
    if not src_shape or not tgt_shape:
        return prod(src_shape) == 1
    return src_shape[0] == tgt_shape[0]


def group(items, module_of):
    """[(name, shape)] -> [(module, [(leaf, shape, name)])] in order of first appearance."""
    groups: dict = {}
    for name, shape in items:
        module = module_of(name)
        leaf = name[len(module) + 1:] if module else name
        groups.setdefault(module, []).append((leaf, tuple(shape), name))
    return list(groups.items())


def pair_groups(src, tgt, allow_reshape=True):
    """-> (weight, [(src name, tgt name, reshaped)], by_name) or None when the groups cannot be the same layer."""
    if len(src) != len(tgt):
        return None
    src_leaves = {leaf: (shape, name) for leaf, shape, name in src}
    tgt_leaves = {leaf: (shape, name) for leaf, shape, name in tgt}
    pairs = []
    reshaped = False
    if src_leaves.keys() == tgt_leaves.keys() and len(src_leaves) == len(src):
        for leaf, (tshape, tname) in tgt_leaves.items():
            sshape, sname = src_leaves[leaf]
            if sshape == tshape:
                pairs.append((sname, tname, False))
            elif allow_reshape and reshape_ok(sshape, tshape):
                pairs.append((sname, tname, True))
                reshaped = True
            else:
                return None
        by_name = True
    else:
        tgt_by_shape = {shape: name for _, shape, name in tgt}
        src_by_shape = {shape: name for _, shape, name in src}
        if len(tgt_by_shape) != len(tgt) or tgt_by_shape.keys() != src_by_shape.keys():
            return None
        pairs = [(src_by_shape[shape], name, False) for shape, name in tgt_by_shape.items()]
        by_name = False
    return len(pairs) * (RESHAPE if reshaped else EXACT), pairs, by_name


def align(src_groups, tgt_groups, allow_reshape=True):
    """-> (accepted [(src module, tgt module, pairs, by_name)], ambiguous [(src module, [tgt modules])], note)."""
    n, m = len(src_groups), len(tgt_groups)
    if not n or not m:
        return [], [], None
    if n * m > MAX_CELLS:
        return [], [], (f"structural alignment skipped: {n} x {m} leftover modules is too many to align; "
                        "use --rename for the rest")
    ids: dict = {}  # group signature -> small int

    def sig(items):
        return ids.setdefault(tuple((leaf, shape) for leaf, shape, _ in items), len(ids))

    def numels(items):  # groups that could pair hold the same element counts
        return tuple(sorted(prod(shape) for _, shape, _ in items))

    src_sigs = [sig(g) for _, g in src_groups]
    tgt_sigs = [sig(g) for _, g in tgt_groups]
    tgt_by_numels: dict = {}
    for j, (_, g) in enumerate(tgt_groups):
        tgt_by_numels.setdefault(numels(g), []).append(j)
    table: dict = {}
    weights = [[0] * m for _ in range(n)]
    for i, (_, g) in enumerate(src_groups):
        row = weights[i]
        for j in tgt_by_numels.get(numels(g), ()):
            key = (src_sigs[i], tgt_sigs[j])
            if key not in table:
                found = pair_groups(g, tgt_groups[j][1], allow_reshape)
                table[key] = found[0] if found else 0
            row[j] = table[key]
    forward = [[0] * (m + 1) for _ in range(n + 1)]  # best over src[:i], tgt[:j]
    for i in range(1, n + 1):
        prev, cur, w = forward[i - 1], forward[i], weights[i - 1]
        for j in range(1, m + 1):
            best = prev[j] if prev[j] > cur[j - 1] else cur[j - 1]
            if w[j - 1] and prev[j - 1] + w[j - 1] > best:
                best = prev[j - 1] + w[j - 1]
            cur[j] = best
    backward = [[0] * (m + 2) for _ in range(n + 2)]  # best over src[i:], tgt[j:]
    for i in range(n - 1, -1, -1):
        nxt, cur, w = backward[i + 1], backward[i], weights[i]
        for j in range(m - 1, -1, -1):
            best = nxt[j] if nxt[j] > cur[j + 1] else cur[j + 1]
            if w[j] and nxt[j + 1] + w[j] > best:
                best = nxt[j + 1] + w[j]
            cur[j] = best
    opt = forward[n][m]
    if not opt:
        return [], [], None
    options_of_src = [[j for j in range(m) if weights[i][j] and forward[i][j] + weights[i][j]
                       + backward[i + 1][j + 1] == opt] for i in range(n)]
    options_of_tgt: dict = {}
    for i, js in enumerate(options_of_src):
        for j in js:
            options_of_tgt.setdefault(j, []).append(i)
    accepted, ambiguous = [], []
    for i, js in enumerate(options_of_src):
        if not js:
            continue
        skippable = any(forward[i][j] + backward[i + 1][j] == opt for j in range(m + 1))
        j = js[0]
        if len(js) == 1 and options_of_tgt[j] == [i] and not skippable:
            _, pairs, by_name = pair_groups(src_groups[i][1], tgt_groups[j][1], allow_reshape)
            accepted.append((src_groups[i][0], tgt_groups[j][0], pairs, by_name))
        else:
            ambiguous.append((src_groups[i][0], [tgt_groups[k][0] for k in js]))
    return accepted, ambiguous, None
