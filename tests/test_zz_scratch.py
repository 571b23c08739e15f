import asyncio
from tests.conftest import World

async def raw(world, target, extra=b""):
    r, w = await asyncio.open_connection("127.0.0.1", world.client.server.port)
    w.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + b"\r\n")
    await w.drain()
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data

async def test_explore(world: World):
    ds, lic, app, tok = await world.licensed()
    d = ds["id"].encode()
    auth = b"Authorization: Bearer " + tok.encode() + b"\r\n"
    for t in [b"/data/"+d+b"/../admin/v1/datasets", b"/data/../admin/v1/datasets", b"/data/"+d+b"/a/../../x",
              b"/data/"+d+b"/%2e%2e/x", b"/data/"+d+b"/..;/x", b"/data/"+d+b"/a\\..\\..\\x", b"/data/"+d+b"/%00",
              b"/data/"+d+b"/a%20b?q=%2F+x&&y", b"/data/"+d+b"/%zz", b"//data/"+d+b"/x", b"http://h/data/"+d+b"/x",
              b"/data/"+d+b"/x\x01", b"/data/"+d+b"/\xc3\xa9", b"/data/"+d+b"/%EF%BC%8E%EF%BC%8E/x", b"/data/"+d+b"/x#frag",
              b"/data/"+d, b"/data/"+d+b"?a=1", b"/data/"+d+b"//etc/passwd", b"*"]:
        out = await raw(world, t, auth)
        print(t, out.split(b"\r\n")[0], out[-250:])
    print([s["raw_path"] for s in world.upstream.seen])
