"""M4 moment matching (docs/algorithms.md section 1, "our formulation"), solved exactly in the dual.

Compressed path: hard tags and a per-signature baseline, so samples with the same signature share
one weight and the problem is over the rows of the signature table, with multiplicity ``count``:

    minimise    sum_s n_s f(q_s; eta_s)              f = (q - eta)^2 / 2   or   q log(q/eta) - q + eta
    subject to  sum_s n_s q_s c_sj <= 0              c_sj = +-b_sj - eps_j a_s,g(j)   (2K rows)
                sum_s n_s q_s = n * retention        (optional budget)
                0 <= q_s <= Q

For duals x = (mu+, mu-, gamma) the minimiser is per signature and closed form, q_s = clip(eta_s -
t_s, 0, Q) (L2) or min(eta_s exp(-t_s), Q) (KL) with t = C mu + gamma, so the dual has 2K + 1
variables whatever n is. Up to MAX_POLISH_VARIABLES duals: L-BFGS-B, then projected Newton on the
active set (dense Hessian). Above that (k = 10^3..10^5 cluster labels): the sparse projected
semismooth Newton of ``newton``, whose Hessian block covers only the shift rows of the free
duals. A feasible problem the dual path does not certify goes to the primal (Clarabel) and back
to the Newton finish (``primal_solve``); anything the data cannot give is one ValueError.

Guarantee: status optimal means every moment within its tolerance up to FEASIBILITY_TOL (1e-9)
of the carrying weight, the budget and held masses within 1e-9 relative, and the KKT residual and
duality gap in the diagnostics (FALLBACK_FEASIBILITY_TOL, 1e-7, when only the interior-point
solution is left; ``solver.method`` says which path).

Label values must be among the label's values (declared, or seen): any other is an error, never
silently left out of the constraints.

hold_labels: each associated label value's mass among the rows carrying the attribute is held
at its baseline (equalities, free duals), and an attribute without targets is centred per pair at
its prevalence among the rows carrying both the attribute and the label (``pi_by_pair``). With
the KL objective, eps = 0 and no budget, the weights are then exactly Kamiran-Calders reweighing
n_s n_y / (n n_sy) counted over the rows carrying both, and 1 on rows missing either, with null
labels too.

Per-sample utility gives every sample its own baseline and needs the streaming path (a
map-reduce of K-vectors per dual evaluation, ``stream``); without it utility enters per signature
as utility_sum / count, which is exact when utility is constant within a signature.

The package, one job a module (the solver imports it lazily: the weigh stage needs only
``objective`` and ``solution``):

    objective     the primal term and its closed forms, for every path
    problem       MomentProblem, the constraint coordinates, build_problem from the recipe
    dual          the dual over signatures: value, gradient, curvature; DualResult
    newton        the sparse projected semismooth Newton
    solve         solve_moments (L-BFGS-B + dense polish, or Newton) and the tolerances
    primal        the largest-feasible-retention LP and the Clarabel fallback
    diagnostics   what report.json says about a solve
    solver        balance.method m4: the infeasibility policy and the solution
    stream        row blocks of the per-sample-utility path, reduced per dual evaluation
    rows          row blocks with projected embeddings (embedding moments)
    embedding     the embedding-moment coordinates and their row stream
    row_dual      the dual over rows (embedding moments)
    row_primal    the row LP or bisection, the warm start, the per-row solution
    solution      the per-row solutions the weigh stage applies
"""
