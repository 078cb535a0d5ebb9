"""L4 AuthorizationPolicy: the projection of validated specs into `Authorization` rules and their evaluator,
with the one principal, namespace and IP-block matcher that node agents and waypoints share.
"""
