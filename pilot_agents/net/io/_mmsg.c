/* Many UDP datagrams per system call: recvmmsg and sendmmsg (Linux), which Python's socket
 * module lacks.
 *
 * A relaying beacon whose packets don't coalesce made two system calls per packet, one to read
 * it and one to send it on. Here one call reads up to a batch of datagrams and hands each to a
 * callback, and one call sends a list of them (benchmarks/RESULTS.md: 0.04 calls per relayed
 * packet, a quarter less CPU). A read datagram may be a UDP GRO run of several (its segment
 * size comes in a control message): it is cut back into them, as the beacon's Python reader
 * does. A send groups consecutive datagrams of one size to one address into one UDP GSO message,
 * as its Python sender does.
 *
 * The system calls hold the GIL: the sockets are non-blocking (MSG_DONTWAIT too). Python code
 * can run between them (the callback, a collection), so a Receiver refuses a second reader while
 * it hands out its buffers, and a send keeps the list's items alive while the kernel reads them.
 * Python's own calls (beacon/udp_batch.py) serve where this module was not compiled or is not
 * Linux.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifdef __linux__
/* Python.h defined _GNU_SOURCE, which declares recvmmsg and sendmmsg. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

/* One GRO size (an int) is all a read's control data holds; room for a little more. */
#define RECV_CONTROL 64
/* A send's messages per sendmmsg, and the iovecs they may use (a GSO run of N datagrams is one
 * message of N iovecs): ~30 KB of stack. A longer list takes several calls. */
#define SEND_MESSAGES 128
#define SEND_IOVECS 1024
#define SEND_CONTROL CMSG_SPACE(sizeof(uint16_t))
/* errno of a datagram this module did not send because its address is not a numeric
 * (host, port): the caller sends it with socket.sendto, which resolves names. */
#define NOT_NUMERIC (-1)

typedef union {
    struct sockaddr sa;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
} address_t;

/* -- receiving ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    unsigned int count; /* datagrams per call */
    size_t size;        /* bytes per datagram buffer */
    struct mmsghdr *messages;
    struct iovec *iovecs;
    address_t *names;
    char *control; /* count * RECV_CONTROL */
    char *data;    /* count * size */
    /* Set during read(): the receive callback (or a collection) may let another thread in,
     * which must not refill the buffers still being handed out. */
    int busy;
    /* Headers the last recvmmsg filled in: only these need resetting before the next (a lone
     * request's datagram would otherwise have all `count` of them, 4 KB, written per call). */
    unsigned int used;
    /* The last sender's address and its (host, port) tuple, handed out again while datagrams
     * come from it: a peer's datagrams make no strings, and the tuple's str keeps its hash. */
    address_t last_name;
    socklen_t last_size;
    PyObject *last_address;
} Receiver;

static void receiver_dealloc(Receiver *self) {
    Py_XDECREF(self->last_address);
    PyMem_Free(self->messages);
    PyMem_Free(self->iovecs);
    PyMem_Free(self->names);
    PyMem_Free(self->control);
    PyMem_Free(self->data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *receiver_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"count", "size", NULL};
    unsigned int count;
    Py_ssize_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "In:Receiver", keywords, &count, &size))
        return NULL;
    if (count < 1 || count > 1024 || size < 1 || size > 65535) {
        PyErr_SetString(PyExc_ValueError,
                        "Receiver(count, size): count 1..1024 datagrams, size 1..65535 bytes");
        return NULL;
    }
    Receiver *self = (Receiver *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->count = count;
    self->size = (size_t)size;
    self->messages = PyMem_Calloc(count, sizeof(struct mmsghdr));
    self->iovecs = PyMem_Calloc(count, sizeof(struct iovec));
    self->names = PyMem_Calloc(count, sizeof(address_t));
    self->control = PyMem_Calloc(count, RECV_CONTROL);
    /* Untouched pages of a large allocation cost no memory: datagrams of 1,200 bytes use the
     * first page of each 64 KB buffer. */
    self->data = PyMem_Malloc(count * self->size);
    if (!self->messages || !self->iovecs || !self->names || !self->control || !self->data) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    for (unsigned int i = 0; i < count; i++) {
        self->iovecs[i].iov_base = self->data + i * self->size;
        self->iovecs[i].iov_len = self->size;
        struct msghdr *header = &self->messages[i].msg_hdr;
        header->msg_name = &self->names[i];
        header->msg_iov = &self->iovecs[i];
        header->msg_iovlen = 1;
        header->msg_control = self->control + i * RECV_CONTROL;
    }
    self->used = count;
    return (PyObject *)self;
}

/* (host, port) as socket.recvfrom gives it (without an IPv6 address's flow and scope). */
static PyObject *address_of(const address_t *name) {
    char host[INET6_ADDRSTRLEN];
    unsigned short port;
    if (name->sa.sa_family == AF_INET) {
        inet_ntop(AF_INET, &name->v4.sin_addr, host, sizeof(host));
        port = ntohs(name->v4.sin_port);
    } else if (name->sa.sa_family == AF_INET6) {
        inet_ntop(AF_INET6, &name->v6.sin6_addr, host, sizeof(host));
        port = ntohs(name->v6.sin6_port);
    } else {
        PyErr_Format(PyExc_OSError, "recvmmsg: a sender of address family %d",
                     name->sa.sa_family);
        return NULL;
    }
    return Py_BuildValue("(sH)", host, port);
}

static int gro_size(struct msghdr *header) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(header); c != NULL; c = CMSG_NXTHDR(header, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
            int size;
            memcpy(&size, CMSG_DATA(c), sizeof(size));
            return size;
        }
    }
    return 0;
}

/* receive(data, address, now) for one datagram: the bytes are the only object made for it. */
static int deliver(PyObject *receive, const char *data, size_t size, PyObject *address,
                   PyObject *now) {
    PyObject *args[3] = {PyBytes_FromStringAndSize(data, (Py_ssize_t)size), address, now};
    if (args[0] == NULL)
        return -1;
    PyObject *result = PyObject_Vectorcall(receive, args, 3, NULL);
    Py_DECREF(args[0]);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* One recvmmsg on fd into the buffers; each datagram read handed to receive. */
static PyObject *read_into(Receiver *self, int fd, PyObject *receive, PyObject *now) {
    /* The kernel wrote into the headers of the datagrams it returned, and into the one
     * after them that found nothing. */
    unsigned int dirty = self->used < self->count ? self->used + 1 : self->count;
    for (unsigned int i = 0; i < dirty; i++) {
        struct msghdr *header = &self->messages[i].msg_hdr;
        header->msg_namelen = sizeof(address_t);
        header->msg_controllen = RECV_CONTROL;
        header->msg_flags = 0;
    }
    int got;
    do {
        got = recvmmsg(fd, self->messages, self->count, MSG_DONTWAIT, NULL);
    } while (got < 0 && errno == EINTR);
    self->used = got > 0 ? (unsigned int)got : 0;
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return PyLong_FromLong(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    for (int i = 0; i < got; i++) {
        struct msghdr *header = &self->messages[i].msg_hdr;
        size_t size = self->messages[i].msg_len;
        /* Cut short by the buffer: not what was sent. */
        if (header->msg_flags & MSG_TRUNC)
            continue;
        const address_t *name = &self->names[i];
        /* (The kernel gives an address's full length, even one longer than the buffer.) */
        socklen_t name_size = header->msg_namelen < sizeof(address_t) ? header->msg_namelen
                                                                       : sizeof(address_t);
        if (self->last_address == NULL || name_size != self->last_size ||
            memcmp(name, &self->last_name, name_size) != 0) {
            PyObject *fresh = address_of(name);
            if (fresh == NULL)
                return NULL;
            Py_XSETREF(self->last_address, fresh);
            memcpy(&self->last_name, name, name_size);
            self->last_size = name_size;
        }
        /* Our own reference: receive may run a read of this Receiver's (refused, busy) or
         * anything else that replaces last_address meanwhile. */
        PyObject *address = Py_NewRef(self->last_address);
        const char *data = self->iovecs[i].iov_base;
        size_t segment = (size_t)gro_size(header);
        if (segment == 0 || segment >= size)
            segment = size > 0 ? size : 1;
        size_t start = 0;
        do {
            size_t length = size - start < segment ? size - start : segment;
            if (deliver(receive, data + start, length, address, now) < 0) {
                Py_DECREF(address);
                return NULL;
            }
            start += segment;
        } while (start < size);
        Py_DECREF(address);
    }
    return PyLong_FromLong(got);
}

/* read(fd, receive, now) -> datagrams read: receive(data, (host, port), now) for each datagram,
 * a GRO run cut into its datagrams. If receive raises, the rest of the batch is lost. */
static PyObject *receiver_read(Receiver *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "read(fd, receive, now): receive must be callable");
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(args[0]);
    if (fd < 0)
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Receiver.read(): in use by another thread");
        return NULL;
    }
    self->busy = 1;
    PyObject *result = read_into(self, fd, args[1], args[2]);
    self->busy = 0;
    return result;
}

static PyMethodDef receiver_methods[] = {
    {"read", (PyCFunction)(void (*)(void))receiver_read, METH_FASTCALL,
     "read(fd, receive, now) -> datagrams read (0: none waiting); calls receive(data, (host, "
     "port), now) for each, a GRO run cut into its datagrams"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pilot_agents.net.io._mmsg.Receiver",
    .tp_basicsize = sizeof(Receiver),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Receiver(count, size): buffers for count datagrams of up to size bytes, read "
              "with one recvmmsg",
    .tp_new = receiver_new,
    .tp_dealloc = (destructor)receiver_dealloc,
    .tp_methods = receiver_methods,
};

/* -- sending -------------------------------------------------------------------------------- */

/* The sockaddr of a (host, port) tuple with a numeric host of the socket's family; 0 if it is
 * not one (no Python error left set). */
static int parse_address(PyObject *address, int family, address_t *name) {
    if (!PyTuple_CheckExact(address) || PyTuple_GET_SIZE(address) < 2)
        return 0;
    PyObject *host = PyTuple_GET_ITEM(address, 0), *port = PyTuple_GET_ITEM(address, 1);
    if (!PyUnicode_CheckExact(host) || !PyLong_CheckExact(port))
        return 0;
    const char *text = PyUnicode_AsUTF8(host);
    long number = PyLong_AsLong(port);
    if (text == NULL || number < 0 || number > 65535) {
        PyErr_Clear();
        return 0;
    }
    memset(name, 0, sizeof(*name));
    if (family == AF_INET) {
        name->v4.sin_family = AF_INET;
        name->v4.sin_port = htons((unsigned short)number);
        return inet_pton(AF_INET, text, &name->v4.sin_addr) == 1;
    }
    name->v6.sin6_family = AF_INET6;
    name->v6.sin6_port = htons((unsigned short)number);
    return inet_pton(AF_INET6, text, &name->v6.sin6_addr) == 1;
}

static socklen_t name_size(int family) {
    return family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
}

/* Appends (start, end, errno) to the failures: datagrams[start:end] were not sent. */
static int failed(PyObject *failures, Py_ssize_t start, Py_ssize_t end, int error) {
    PyObject *entry = Py_BuildValue("(nni)", start, end, error);
    if (entry == NULL)
        return -1;
    int result = PyList_Append(failures, entry);
    Py_DECREF(entry);
    return result;
}

/* The (data, address) at `index`, its address parsed; 0 if not sendable here. */
static int datagram_at(PyObject *items, Py_ssize_t index, int family, PyObject **data,
                       PyObject **last_address, address_t *last_name, address_t *name) {
    PyObject *item = PyTuple_GET_ITEM(items, index);
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2 ||
        !PyBytes_CheckExact(PyTuple_GET_ITEM(item, 0)))
        return 0;
    *data = PyTuple_GET_ITEM(item, 0);
    PyObject *address = PyTuple_GET_ITEM(item, 1);
    /* Answers to one node share its address tuple: parsed once per call. */
    if (address == *last_address) {
        *name = *last_name;
        return 1;
    }
    if (!parse_address(address, family, name))
        return 0;
    *last_address = address;
    *last_name = *name;
    return 1;
}

/* sendmmsg the messages built so far; on an error the failed message is reported and skipped,
 * and a full buffer (EAGAIN) ends the whole send: -2 then. */
static int flush(int fd, PyObject *failures, struct mmsghdr *messages, unsigned int count,
                 const Py_ssize_t *starts, const Py_ssize_t *ends, Py_ssize_t total) {
    unsigned int sent = 0; /* none built: no call */
    while (sent < count) {
        int n = sendmmsg(fd, messages + sent, count - sent, MSG_DONTWAIT);
        if (n > 0) {
            sent += (unsigned int)n;
            continue;
        }
        int error = n < 0 ? errno : EIO;
        if (error == EINTR)
            continue;
        if (error == EAGAIN || error == EWOULDBLOCK)
            return failed(failures, starts[sent], total, error) < 0 ? -1 : -2;
        if (failed(failures, starts[sent], ends[sent], error) < 0)
            return -1;
        sent++;
    }
    return 0;
}

/* send(fd, family, datagrams, gso_size, gso_segments, gso_bytes) -> [(start, end, errno)] */
static PyObject *send_(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 || !PyList_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "send(fd, family, datagrams, gso_size, gso_segments, gso_bytes): "
                        "datagrams must be a list");
        return NULL;
    }
    long values[5];
    const int positions[5] = {0, 1, 3, 4, 5};
    for (int k = 0; k < 5; k++) {
        values[k] = PyLong_AsLong(args[positions[k]]);
        if (values[k] == -1 && PyErr_Occurred())
            return NULL;
    }
    int fd = (int)values[0], family = (int)values[1];
    long gso_size = values[2], gso_segments = values[3], gso_bytes = values[4];
    if ((family != AF_INET && family != AF_INET6) || gso_segments < 1 ||
        gso_segments > SEND_IOVECS / 2) {
        PyErr_SetString(PyExc_ValueError, "send(): an AF_INET or AF_INET6 socket, and "
                                          "gso_segments 1..512");
        return NULL;
    }
    /* The kernel reads the bytes objects after Python code may have run (a collection while a
     * failure is recorded): a tuple of the list's items keeps them alive whatever the list. */
    PyObject *items = PyList_AsTuple(args[2]);
    if (items == NULL)
        return NULL;
    PyObject *failures = PyList_New(0);
    if (failures == NULL) {
        Py_DECREF(items);
        return NULL;
    }

    struct mmsghdr messages[SEND_MESSAGES];
    struct iovec iovecs[SEND_IOVECS];
    address_t names[SEND_MESSAGES];
    union {
        struct cmsghdr align; /* a cmsghdr's alignment, which a char array lacks */
        char bytes[SEND_CONTROL];
    } control[SEND_MESSAGES];
    Py_ssize_t starts[SEND_MESSAGES], ends[SEND_MESSAGES];
    unsigned int count = 0, used = 0;
    PyObject *last_address = NULL;
    address_t last_name = {0};
    Py_ssize_t total = PyTuple_GET_SIZE(items);
    Py_ssize_t i = 0;
    /* The next datagram, parsed ahead: a run ends at the first one that does not join it. */
    PyObject *data = NULL;
    address_t name;
    int ok = total > 0 && datagram_at(items, 0, family, &data, &last_address, &last_name, &name);
    while (i < total) {
        /* Full, or a datagram left to the caller: what was built goes first, so that a full
         * buffer's failure (the rest of the list) never covers a datagram reported before. */
        if (!ok || count == SEND_MESSAGES || used + (unsigned int)gso_segments > SEND_IOVECS) {
            int result = flush(fd, failures, messages, count, starts, ends, total);
            if (result == -1)
                goto error;
            if (result == -2)
                goto done;
            count = used = 0;
        }
        if (!ok) {
            if (failed(failures, i, i + 1, NOT_NUMERIC) < 0)
                goto error;
            i++;
            ok = i < total &&
                 datagram_at(items, i, family, &data, &last_address, &last_name, &name);
            continue;
        }
        Py_ssize_t size = PyBytes_GET_SIZE(data);
        struct mmsghdr *message = &messages[count];
        memset(message, 0, sizeof(*message));
        names[count] = name;
        message->msg_hdr.msg_name = &names[count];
        message->msg_hdr.msg_namelen = name_size(family);
        message->msg_hdr.msg_iov = &iovecs[used];
        iovecs[used].iov_base = PyBytes_AS_STRING(data);
        iovecs[used].iov_len = (size_t)size;
        unsigned int segments = 1;
        long limit = size > 0 && size <= gso_size ? gso_bytes / size : 1;
        if (limit > gso_segments)
            limit = gso_segments;
        starts[count] = i;
        i++;
        ok = i < total && datagram_at(items, i, family, &data, &last_address, &last_name, &name);
        while (ok && segments < limit && PyBytes_GET_SIZE(data) == size &&
               memcmp(&name, &names[count], sizeof(name)) == 0) {
            iovecs[used + segments].iov_base = PyBytes_AS_STRING(data);
            iovecs[used + segments].iov_len = (size_t)size;
            segments++;
            i++;
            ok = i < total &&
                 datagram_at(items, i, family, &data, &last_address, &last_name, &name);
        }
        message->msg_hdr.msg_iovlen = segments;
        if (segments > 1) {
            message->msg_hdr.msg_control = control[count].bytes;
            message->msg_hdr.msg_controllen = SEND_CONTROL;
            struct cmsghdr *c = CMSG_FIRSTHDR(&message->msg_hdr);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t segment = (uint16_t)size;
            memcpy(CMSG_DATA(c), &segment, sizeof(segment));
        }
        ends[count] = i;
        count++;
        used += segments;
    }
    if (flush(fd, failures, messages, count, starts, ends, total) == -1)
        goto error;
done:
    Py_DECREF(items);
    return failures;
error:
    Py_DECREF(items);
    Py_DECREF(failures);
    return NULL;
}

static PyMethodDef methods[] = {
    {"send", (PyCFunction)(void (*)(void))send_, METH_FASTCALL,
     "send(fd, family, datagrams, gso_size, gso_segments, gso_bytes) -> [(start, end, errno)]: "
     "sends the (bytes, (host, port)) list with sendmmsg, consecutive datagrams of one size up "
     "to gso_size (0: none) to one address as one UDP GSO message of up to gso_segments and "
     "gso_bytes; what failed, as slices of the list (errno -1: address not numeric, not sent)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_mmsg",
    "Many UDP datagrams per system call: recvmmsg and sendmmsg (Linux).", -1, methods,
};

PyMODINIT_FUNC PyInit__mmsg(void) {
    if (PyType_Ready(&ReceiverType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "NOT_NUMERIC", NOT_NUMERIC) < 0 ||
        PyModule_AddObjectRef(module, "Receiver", (PyObject *)&ReceiverType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

#else /* not Linux: the importer falls back to Python's socket calls */

PyMODINIT_FUNC PyInit__mmsg(void) {
    PyErr_SetString(PyExc_ImportError, "_mmsg: recvmmsg and sendmmsg are Linux only");
    return NULL;
}

#endif
