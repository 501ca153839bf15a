/* A C oracle for pyxen9p's ring logic, built by the tests from Xen's own
 * public headers (libxen-dev: xen/io/9pfs.h and xen/io/ring.h). Nothing here
 * reimplements the ring: every copy and index computation is Xen's macro. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <xen/io/9pfs.h>

size_t oracle_sizeof_intf(void) { return sizeof(struct xen_9pfs_data_intf); }

size_t oracle_offsetof(int field)
{
    switch (field) {
    case 0: return offsetof(struct xen_9pfs_data_intf, in_cons);
    case 1: return offsetof(struct xen_9pfs_data_intf, in_prod);
    case 2: return offsetof(struct xen_9pfs_data_intf, out_cons);
    case 3: return offsetof(struct xen_9pfs_data_intf, out_prod);
    case 4: return offsetof(struct xen_9pfs_data_intf, ring_order);
    case 5: return offsetof(struct xen_9pfs_data_intf, ref);
    default: return (size_t)-1;
    }
}

unsigned long oracle_ring_size(int order) { return XEN_FLEX_RING_SIZE(order); }

RING_IDX oracle_queued(RING_IDX prod, RING_IDX cons, RING_IDX ring_size)
{
    return xen_9pfs_queued(prod, cons, ring_size);
}

/* Write one packet at free-running index prod (cons bounds the free space). */
void oracle_write(unsigned char *buf, const void *data, size_t size, RING_IDX prod,
                  RING_IDX cons, RING_IDX ring_size)
{
    RING_IDX masked_prod = xen_9pfs_mask(prod, ring_size);
    xen_9pfs_write_packet(buf, data, size, &masked_prod, xen_9pfs_mask(cons, ring_size),
                          ring_size);
}

/* Read one packet at free-running index cons (prod bounds the data). */
void oracle_read(void *out, const unsigned char *buf, size_t size, RING_IDX prod,
                 RING_IDX cons, RING_IDX ring_size)
{
    RING_IDX masked_cons = xen_9pfs_mask(cons, ring_size);
    xen_9pfs_read_packet(out, buf, size, xen_9pfs_mask(prod, ring_size), &masked_cons,
                         ring_size);
}

/* A minimal backend step, written with Xen's macros only: move every whole
 * 9P message queued on `out` to `in`, as an echo server would, while `in`
 * has room. Returns the number of messages moved. */
int oracle_backend_echo(struct xen_9pfs_data_intf *intf, unsigned char *data, int order)
{
    RING_IDX ring_size = XEN_FLEX_RING_SIZE(order);
    unsigned char *in = data, *out = data + ring_size;
    unsigned char msg[1 << 20];
    int moved = 0;

    for (;;) {
        RING_IDX out_cons = intf->out_cons, out_prod = intf->out_prod;
        RING_IDX in_cons = intf->in_cons, in_prod = intf->in_prod;
        __sync_synchronize();
        RING_IDX queued = xen_9pfs_queued(out_prod, out_cons, ring_size);
        uint32_t size;
        if (queued < 7)
            return moved;
        oracle_read(&size, out, 4, out_prod, out_cons, ring_size);
        if (size < 7 || size > queued || size > sizeof(msg))
            return moved;
        if (ring_size - xen_9pfs_queued(in_prod, in_cons, ring_size) < size)
            return moved;
        oracle_read(msg, out, size, out_prod, out_cons, ring_size);
        __sync_synchronize();
        intf->out_cons = out_cons + size;
        oracle_write(in, msg, size, in_prod, in_cons, ring_size);
        __sync_synchronize();
        intf->in_prod = in_prod + size;
        moved++;
    }
}
