"""HTTP on the waypoint's tunnels: HTTP/1.1 and HTTP/2 server and client sides, protocol detection,
and the exchange the request pipeline sees."""
